"""Stop and cancel requests, kept in the study's storage so every host sees them.

``stop``: take no new trial, let the running ones finish. ``cancel``: also prune the running
ones at their next check (reason ``cancelled``), killing them after the grace period. The flag
is a study user attribute; the next ``optguard run`` clears it. Reads and writes go through
the storage's own calls, which ride out an outage (``optguard.storage.open_storage``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import optuna

__all__ = [
    "ACTIONS", "CONTROL_ATTR", "read_request", "request", "request_in", "set_request",
    "clear_request",
]

ACTIONS = ("stop", "cancel")
CONTROL_ATTR = "optguard.control"


def read_request(storage: "optuna.storages.BaseStorage", study_id: int) -> str | None:
    return request_in(storage.get_study_user_attrs(study_id))


def request_in(attrs: Mapping[str, Any]) -> str | None:
    """The pending action in the study's user attributes ``attrs``, if any."""
    value: Any = attrs.get(CONTROL_ATTR)
    action = value.get("action") if isinstance(value, dict) else None
    return action if action in ACTIONS else None


def clear_request(storage: "optuna.storages.BaseStorage", study_id: int) -> str | None:
    """Clear the flag; returns the action that was pending, if any."""
    action = read_request(storage, study_id)
    if action is not None:
        storage.set_study_user_attr(study_id, CONTROL_ATTR, {"action": None})
    return action


def set_request(storage: "optuna.storages.BaseStorage", study_id: int, action: str) -> None:
    storage.set_study_user_attr(study_id, CONTROL_ATTR, {"action": action, "at": time.time()})


def request(study: str, storage_url: str | None, action: str) -> str:
    """Set ``stop`` or ``cancel`` on a study; returns the masked storage URL it was set on."""
    from optguard.storage import DEFAULT_OUTAGE_S, mask_url, open_existing_study

    url, storage, study_id = open_existing_study(study, storage_url, DEFAULT_OUTAGE_S)
    set_request(storage, study_id, action)
    return mask_url(url)
