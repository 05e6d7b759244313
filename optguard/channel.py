"""The pipes between the supervisor and each worker it started.

Status (worker -> supervisor): ``ready``, ``start`` (trial number, id, start time on the
host's monotonic clock) and ``end`` events, so the supervisor knows what each worker runs
without polling the storage. Control (supervisor -> worker): ``soft``/``interrupt``/``kill``
commands for a trial, and ``peak`` memory of the worker's process tree. A command is followed
by SIGUSR1 (or SIGTERM for a kill) so the worker reads it at once. Messages are JSON lines;
both ends are non-blocking, and a full control pipe drops ``peak`` updates rather than stall
the supervisor.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["LineReader", "open_pipe_pair", "send", "take_storage_url"]

STATUS_FD_ENV = "OPTGUARD_STATUS_FD"
CONTROL_FD_ENV = "OPTGUARD_CONTROL_FD"
WORKER_ENV = "OPTGUARD_WORKER"  # inherited by every descendant: tells whose orphan it is
SUPERVISOR_ENV = "OPTGUARD_SUPERVISOR_PID"
TRIAL_ENV = "OPTGUARD_TRIAL"  # set during a trial: processes it execs tell which trial it was
RUN_ENV = "OPTGUARD_RUN"  # inherited by everything a run starts: the keeper's sweep finds it
STORAGE_ENV = "OPTGUARD_STORAGE"  # a URL given by the user; never passed on to children
STORAGE_FD_ENV = "OPTGUARD_STORAGE_FD"  # a pipe holding the URL, from the supervisor


class LineReader:
    """Reads whole JSON lines from a non-blocking descriptor; partial lines wait for the rest."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""
        self.eof = False  # the writer closed its end: nothing more will come
        os.set_blocking(fd, False)

    def read(self) -> list[dict[str, Any]]:
        chunks = []
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                self.eof = True
                break  # the other end is gone; what was read is still returned
            if not chunk:
                self.eof = True
                break
            chunks.append(chunk)
        if not chunks:
            return []
        data = self._buffer + b"".join(chunks)
        *lines, self._buffer = data.split(b"\n")
        messages = []
        for line in lines:
            try:
                messages.append(json.loads(line))
            except ValueError:
                continue  # a corrupt line cannot come from optguard itself; skip it
        return messages


def send(fd: int, message: dict[str, Any]) -> bool:
    """Write one message; ``False`` when the pipe is full or closed (the message is dropped)."""
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    try:
        return os.write(fd, data) == len(data)
    except (BlockingIOError, BrokenPipeError):
        return False


def open_pipe_pair() -> tuple[int, int, int, int]:
    """``(status_r, status_w, control_r, control_w)``; the supervisor's ends are non-blocking."""
    status_r, status_w = os.pipe()
    control_r, control_w = os.pipe()
    os.set_blocking(control_w, False)
    return status_r, status_w, control_r, control_w


def take_storage_url() -> str | None:
    """The storage URL for this process, removed from its environment so that nothing a trial
    starts inherits a password: the supervisor's pipe, else ``OPTGUARD_STORAGE``."""
    url = os.environ.pop(STORAGE_ENV, None)
    fd_text = os.environ.pop(STORAGE_FD_ENV, None)
    if fd_text is None or not fd_text.isdigit():
        return url
    fd = int(fd_text)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode() or url
