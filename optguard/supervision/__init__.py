"""``optguard run``'s supervisor: starts N workers, enforces limits from outside, ends the
run truthfully. One module per concern: ``workers`` (processes and pipes), ``escalation``
(what to do about a trial), ``exits`` (what a worker's exit means), ``outcome`` (the run's
exit code), ``orphans``, ``keeper``, and ``supervisor`` (the loop that samples and acts).

Imports are lazy: ``python -m optguard.supervision.keeper`` must start without Optuna.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optguard.supervision.supervisor import RunResult, run_study

__all__ = ["RunResult", "run_study"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from optguard.supervision import supervisor

        return getattr(supervisor, name)
    raise AttributeError(name)
