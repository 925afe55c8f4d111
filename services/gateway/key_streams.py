"""Streams per API key on this gateway, for keys the keys file gives a ``max_streams``.

A tenant's keys share its ``MESH_GATEWAY_MAX_STREAMS_PER_TENANT``; a key with a limit of its own
(``mesh keys create --max-streams N``) may hold at most that many of them, so one program of a
tenant cannot take all of its streams from the tenant's other programs.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from mesh.auth import Principal
from mesh.errors import ResourceExhausted
from services.gateway.caches import uncount


class KeyStreams:
    """Counts open streams of the keys that have a stream limit."""

    def __init__(self) -> None:
        self._held: Counter[str] = Counter()

    def held(self, key: Principal) -> int:
        return self._held.get(key.key_hash, 0)

    @contextlib.contextmanager
    def hold(self, key: Principal | None) -> Iterator[None]:
        """One stream of ``key`` for the block; RESOURCE_EXHAUSTED (``KEY_STREAM_LIMIT``) when
        the key already holds its ``max_streams``. A key without a limit is not counted."""
        if key is None or key.max_streams is None:
            yield
            return
        held = self._held[key.key_hash]
        if held >= key.max_streams:
            raise ResourceExhausted(
                f"API key {key.key_id} already has {held} open streams on this gateway, its "
                f"limit (max_streams in the keys file); close streams it no longer reads, or "
                "retry shortly",
                reason="KEY_STREAM_LIMIT",
                retry_after_s=1.0,
                quota_subject=f"key:{key.key_id}",
            )
        self._held[key.key_hash] += 1
        try:
            yield
        finally:
            uncount(self._held, key.key_hash)
