"""The host's one way into a database server: the supervisor serves its workers' storage
calls on its own connections.

Each worker holding its own connections (one for the storage, one for the study-wide lock)
made a host of N workers hold 2N + 2 of them, and a study stopped scaling at about 45
workers on PostgreSQL's default ``max_connections`` of 100, long before the database was
busy. Under ``optguard run`` on PostgreSQL or MySQL, a worker's storage is a client of its
supervisor (``client``) over a socket pair made for it, and the supervisor runs the calls
(``server``) on a pool of two connections, the study-wide lock taken on one of them while
held: two per host whatever ``--workers`` is. What travels and how errors come back is
``protocol``. SQLite and the journal file keep direct access: there is no server to spare,
and a file has no connection limit.
"""

from __future__ import annotations

from optguard.gateway.protocol import serves

__all__ = ["serves"]
