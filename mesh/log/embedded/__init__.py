"""The embedded log driver: one SQLite file shared by every process of a single-machine mesh.

Why SQLite: it is in the standard library, durable on local disk, and in WAL mode many processes
(gateway, agents, persister) can read while one writes. Offsets are allocated inside ``BEGIN
IMMEDIATE`` transactions, which take the database's write lock first, so two processes can never
hand out the same offset and a partition never has gaps.

Threads: sqlite3 calls block, so they never run on the event loop. Writes (appends, heartbeats,
commits) go through one writer thread with its own connection; reads through one reader thread;
a third thread notices other processes' commits through ``PRAGMA data_version`` (a counter
that changes whenever another connection commits; checking it costs microseconds) and only then
looks at the partitions' next offsets to wake the tails of the partitions that grew. It checks
as soon as inotify reports a write in the log's directory (``mesh.log.embedded.fs_watch``), with
a slow re-check in case a report is lost; without inotify it polls every ``poll_interval_s``.

Durability: ``synchronous=NORMAL`` in WAL mode keeps every commit across a crash of any process;
only an OS crash or power loss can drop the last commits before a checkpoint. That is the
trade-off the embedded profile makes for token streams; Kafka with ``acks=all`` is the
replicated option.

Modules, one job each:

- ``store``: the SQLite file (schema, connections, transactions, the two database threads).
- ``changes``: per-partition change counters that waiting tasks sleep on.
- ``poller`` and ``fs_watch``: the thread that notices other processes' commits.
- ``producer``: ``append``, batching queued records into one transaction each.
- ``fetcher``: ``read`` (the tail), ``read_range`` and ``end_offset``.
- ``group``: consumer-group membership (heartbeat leases, computed assignment, commits).
- ``log``: ``EmbeddedLog``, which starts, wires and stops the others.
"""

from mesh.log.embedded.group import assign
from mesh.log.embedded.log import EmbeddedLog

__all__ = ["EmbeddedLog", "assign"]
