"""API keys per tenant, the auth interceptor, and per-key rate limiting.

Keys are random strings handed out once (``mesh keys create``); only their SHA-256 is stored, in a
JSON file mapping the hex digest to a tenant (and optionally the key's own limits)::

    {
      "9f86d0...": "acme",
      "2c26b4...": {"tenant": "globex", "rate_per_s": 20, "burst": 40,
                    "tokens_per_minute": 20000, "max_streams": 50, "max_queued_turns": 8,
                    "created_at": "2026-01-01T00:00:00+00:00",
                    "expires_at": "2026-07-01T00:00:00+00:00"}
    }

``rate_per_s``/``burst`` replace the gateway's default turn rate for the key;
``tokens_per_minute`` is a budget of the key's own, enforced on top of its tenant's
(services/gateway/token_budget.py), and ``max_streams`` bounds the streams the key holds open on
a gateway, on top of its tenant's share (``MESH_GATEWAY_MAX_STREAMS_PER_TENANT``);
``max_queued_turns`` bounds the key's unfinished turns on all partitions together, on top of its
tenant's share (``MESH_GATEWAY_MAX_QUEUED_TURNS_PER_TENANT``). Every field
but ``tenant`` is optional, so older files stay valid.

A key is named by its id, the first 12 hex digits of its hash: safe to show, log and pass to
``mesh keys revoke``. A key past its ``expires_at`` is refused. The gateway re-reads the file when
it changes; a broken edit is logged as an error and counted (``mesh_api_keys_file_errors_total``),
and the last good keys stay in use.

The interceptor resolves ``x-api-key`` to a ``Principal`` and exposes it to the handler through a
context variable (``current_principal()``). Health and reflection need no key, so probes and
tooling work without secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from mesh import audit
from mesh.errors import InvalidArgument, MeshError, ResourceExhausted, Unauthenticated
from mesh.interceptors import abort_with, wrap_handler
from mesh.metrics import API_KEYS_FILE_ERRORS, API_KEYS_FILE_VALID
from mesh.settings import default_state_dir

_log = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"
KEY_PREFIX = "mk_"
# Services reachable without a key: probes and tooling must not need secrets.
DEFAULT_PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

# Bounds what we hash for a request: a key we issue is ~46 characters.
_MAX_KEY_CHARS = 256
_TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# A key id is a prefix of its hash: 12 hex digits shown, at least 8 accepted back.
KEY_ID_CHARS = 12
_KEY_ID = re.compile(r"^[0-9a-f]{8,64}$")


def hash_key(key: str) -> str:
    """SHA-256 hex digest of an API key: the only form in which keys are stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_api_key() -> str:
    """A fresh random API key (256 bits of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def default_keys_file(environ: Mapping[str, str]) -> Path:
    """``MESH_GATEWAY_API_KEYS_FILE``, or ``$MESH_STATE_DIR/api-keys.json``."""
    value = environ.get("MESH_GATEWAY_API_KEYS_FILE", "")
    if value:
        return Path(value).absolute()
    return default_state_dir(environ) / "api-keys.json"


def validate_tenant_id(tenant_id: str) -> str:
    if not _TENANT_PATTERN.match(tenant_id):
        raise InvalidArgument(
            f"tenant id {tenant_id[:80]!r} must be 1-64 characters of letters, digits, '.', '_' "
            "or '-', starting with a letter or digit",
            reason="TENANT_INVALID",
            field="tenant",
        )
    return tenant_id


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """What a stored key grants: its tenant, optionally its own rate limit, and until when."""

    tenant_id: str
    rate_per_s: float | None = None
    burst: int | None = None
    # Seconds since the epoch after which the key is refused; None: it never expires.
    expires_at: float | None = None
    created_at: float | None = None
    # Generated tokens the key may start per minute, on top of its tenant's budget.
    tokens_per_minute: int | None = None
    # Streams the key may hold open on one gateway, on top of its tenant's limit.
    max_streams: int | None = None
    # Unfinished turns the key may hold on all partitions together, on top of its tenant's share.
    max_queued_turns: int | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of an RPC."""

    tenant_id: str
    # SHA-256 of the key: identifies the key for rate limiting without holding the secret.
    key_hash: str
    rate_per_s: float | None = None
    burst: int | None = None
    tokens_per_minute: int | None = None
    max_streams: int | None = None
    max_queued_turns: int | None = None

    @property
    def key_id(self) -> str:
        """Short, non-secret name of the key for logs."""
        return self.key_hash[:KEY_ID_CHARS]


class KeyFileError(ValueError):
    """The keys file exists but is not a valid keys file; the message says where."""


class UnknownKeyError(LookupError):
    """No key (or more than one) in the keys file has the given id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown key"


def _timestamp(value: object, what: str, source: str, digest: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is not None:
                return parsed.timestamp()
    raise KeyFileError(
        f"{source}: entry {digest[:KEY_ID_CHARS]} {what} must be an ISO 8601 time with a "
        f"UTC offset, like 2026-07-01T00:00:00+00:00 (got {value!r})"
    )


def _key_limit(value: object, name: str, source: str, digest: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KeyFileError(f"{source}: entry {digest[:12]}… {name} must be an integer >= 1")
    return value


def parse_keys(data: object, *, source: str = "keys file") -> dict[str, KeyEntry]:
    """Validate the JSON of a keys file into ``{sha256 hex: KeyEntry}``."""
    if not isinstance(data, dict):
        raise KeyFileError(f"{source}: expected a JSON object mapping key hashes to tenants")
    entries: dict[str, KeyEntry] = {}
    for digest, value in data.items():
        if not isinstance(digest, str) or not _HEX_DIGEST.match(digest):
            raise KeyFileError(f"{source}: {digest!r} is not a lowercase sha256 hex digest")
        tenant: object
        rate: object
        burst: object
        expires: object = None
        created: object = None
        tokens: object = None
        streams: object = None
        queued: object = None
        if isinstance(value, str):
            tenant, rate, burst = value, None, None
        elif isinstance(value, dict):
            tenant = value.get("tenant")
            rate = value.get("rate_per_s")
            burst = value.get("burst")
            expires = value.get("expires_at")
            created = value.get("created_at")
            tokens = value.get("tokens_per_minute")
            streams = value.get("max_streams")
            queued = value.get("max_queued_turns")
        else:
            raise KeyFileError(f"{source}: entry {digest[:12]}… must be a tenant or an object")
        if not isinstance(tenant, str) or not _TENANT_PATTERN.match(tenant):
            raise KeyFileError(f"{source}: entry {digest[:12]}… has an invalid tenant {tenant!r}")
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0
        ):
            raise KeyFileError(f"{source}: entry {digest[:12]}… rate_per_s must be > 0")
        if burst is not None and (
            isinstance(burst, bool) or not isinstance(burst, int) or burst < 1
        ):
            raise KeyFileError(f"{source}: entry {digest[:12]}… burst must be an integer >= 1")
        entries[digest] = KeyEntry(
            tenant,
            None if rate is None else float(rate),
            None if burst is None else int(burst),
            _timestamp(expires, "expires_at", source, digest),
            _timestamp(created, "created_at", source, digest),
            tokens_per_minute=_key_limit(tokens, "tokens_per_minute", source, digest),
            max_streams=_key_limit(streams, "max_streams", source, digest),
            max_queued_turns=_key_limit(queued, "max_queued_turns", source, digest),
        )
    return entries


class KeyStore:
    """Hashed API keys, reloaded when the keys file changes (so new keys need no restart).

    Revoked and expired keys are refused by ``resolve`` for new calls and by ``verify`` for
    calls already open (the gateway checks each Chat frame), within ``check_interval_s``.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        entries: Mapping[str, KeyEntry] | None = None,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        service: str = "gateway",
    ) -> None:
        self._path = path
        self._entries: dict[str, KeyEntry] = dict(entries or {})
        self._check_interval_s = check_interval_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._service = service
        self._next_check = 0.0
        self._stamp: tuple[int, int] | None = None
        self._failed_stamp: tuple[int, int] | None = None
        self.last_error: str | None = None
        if path is not None:
            self._reload(force=True)

    @property
    def path(self) -> Path | None:
        return self._path

    def __len__(self) -> int:
        return len(self._entries)

    def _reload(self, *, force: bool = False) -> None:
        assert self._path is not None
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            self._entries, self._stamp = {}, None
            self._loaded()
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if not force and stamp in (self._stamp, self._failed_stamp):
            return
        try:
            data = json.loads(self._path.read_text(encoding="utf-8") or "{}")
            entries = parse_keys(data, source=str(self._path))
        except (OSError, ValueError) as error:
            if force:
                raise KeyFileError(str(error)) from error
            # A half-written or broken edit must not lock everyone out: keep the last good keys,
            # and say so loudly once per broken version of the file.
            self._failed_stamp = stamp
            self.last_error = str(error)
            API_KEYS_FILE_ERRORS.labels(self._service).inc()
            API_KEYS_FILE_VALID.labels(self._service).set(0)
            _log.error(
                "API keys file %s is malformed, so it was not loaded; the %d keys loaded before "
                "stay in use until it is fixed: %s",
                self._path,
                len(self._entries),
                error,
            )
            return
        self._entries, self._stamp = entries, stamp
        self._loaded()

    def _loaded(self) -> None:
        if self.last_error is not None:
            _log.info("API keys file %s loaded again (%d keys)", self._path, len(self._entries))
        self._failed_stamp, self.last_error = None, None
        API_KEYS_FILE_VALID.labels(self._service).set(1)

    async def watch(self) -> None:
        """Re-read the file every ``check_interval_s`` until cancelled, so a change (and a broken
        edit's error and metric) shows without waiting for a call to look a key up."""
        while True:
            await asyncio.sleep(self._check_interval_s)
            self._maybe_reload()

    def _maybe_reload(self) -> None:
        if self._path is None:
            return
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._check_interval_s
            self._reload()

    def resolve(self, key: str | None) -> Principal:
        """The principal of ``key``; UNAUTHENTICATED when it is missing, unknown or expired."""
        if not key:
            raise Unauthenticated(
                f"missing API key: send it in the {API_KEY_HEADER!r} metadata",
                reason="API_KEY_MISSING",
            )
        if len(key) > _MAX_KEY_CHARS:
            raise Unauthenticated("invalid API key", reason="API_KEY_INVALID")
        self._maybe_reload()
        digest = hash_key(key)
        # A dict lookup by digest is fine without a constant-time compare: timing can only tell
        # an attacker about digests of keys they chose, never about a stored key's bytes.
        entry = self._entries.get(digest)
        if entry is None:
            raise Unauthenticated("invalid API key", reason="API_KEY_INVALID")
        self._refuse_expired(digest, entry)
        return Principal(
            entry.tenant_id,
            digest,
            entry.rate_per_s,
            entry.burst,
            tokens_per_minute=entry.tokens_per_minute,
            max_streams=entry.max_streams,
            max_queued_turns=entry.max_queued_turns,
        )

    def verify(self, principal: Principal) -> None:
        """UNAUTHENTICATED if the principal's key was revoked or has expired since it was
        resolved; what long-lived streams call before acting on a frame."""
        self._maybe_reload()
        entry = self._entries.get(principal.key_hash)
        if entry is None or entry.tenant_id != principal.tenant_id:
            raise Unauthenticated(
                f"API key {principal.key_id} was revoked; reconnect with a valid key",
                reason="API_KEY_REVOKED",
            )
        self._refuse_expired(principal.key_hash, entry)

    def _refuse_expired(self, digest: str, entry: KeyEntry) -> None:
        if entry.expires_at is not None and entry.expired(self._wall_clock()):
            when = datetime.fromtimestamp(entry.expires_at, UTC).isoformat(timespec="seconds")
            raise Unauthenticated(
                f"API key {digest[:KEY_ID_CHARS]} expired at {when}; use a newer key of the "
                "tenant (`mesh keys rotate` makes one)",
                reason="API_KEY_EXPIRED",
            )


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What ``mesh keys list`` shows of a stored key: never the key, only its id."""

    key_id: str
    tenant_id: str
    created_at: float | None
    expires_at: float | None
    rate_per_s: float | None
    burst: int | None
    tokens_per_minute: int | None = None
    max_streams: int | None = None
    max_queued_turns: int | None = None


@contextlib.contextmanager
def _locked_keys(path: Path) -> Iterator[dict[str, Any]]:
    """The keys file's JSON, validated, for a read-modify-write under an exclusive lock.

    The lock (a sidecar file) keeps two CLI edits from losing each other's change; the data
    the block leaves is written atomically (temp file + rename), readable by its owner only.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        data = _read_keys_json(path)
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            parse_keys(data, source=str(path))
            _write_keys_json(path, data)


def _read_keys_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError as error:
        raise KeyFileError(f"{path}: not valid JSON ({error}); fix or restore it first") from None
    parse_keys(data, source=str(path))
    assert isinstance(data, dict)
    return data


def _write_keys_json(path: Path, data: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".api-keys-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _new_entry(
    data: dict[str, Any],
    tenant_id: str,
    rate_per_s: float | None,
    burst: int | None,
    expires_at: float | None,
    tokens_per_minute: int | None = None,
    max_streams: int | None = None,
    max_queued_turns: int | None = None,
) -> str:
    key = new_api_key()
    entry: dict[str, Any] = {"tenant": tenant_id, "created_at": _iso(time.time())}
    if rate_per_s is not None:
        entry["rate_per_s"] = rate_per_s
    if burst is not None:
        entry["burst"] = burst
    if tokens_per_minute is not None:
        entry["tokens_per_minute"] = tokens_per_minute
    if max_streams is not None:
        entry["max_streams"] = max_streams
    if max_queued_turns is not None:
        entry["max_queued_turns"] = max_queued_turns
    if expires_at is not None:
        entry["expires_at"] = _iso(expires_at)
    data[hash_key(key)] = entry
    return key


def add_key_to_file(
    path: Path,
    tenant_id: str,
    *,
    rate_per_s: float | None = None,
    burst: int | None = None,
    expires_at: float | None = None,
    tokens_per_minute: int | None = None,
    max_streams: int | None = None,
    max_queued_turns: int | None = None,
) -> str:
    """Create a key for ``tenant_id``, store its hash in ``path`` and return the key itself.

    The file is replaced atomically and readable by its owner only; the key is never written.
    ``expires_at`` (seconds since the epoch) makes the gateway refuse the key from then on;
    ``tokens_per_minute``, ``max_streams`` and ``max_queued_turns`` give the key limits of its
    own, on top of its tenant's.
    """
    validate_tenant_id(tenant_id)
    for what, limit in (
        ("tokens per minute", tokens_per_minute),
        ("max streams", max_streams),
        ("max queued turns", max_queued_turns),
    ):
        if limit is not None and limit < 1:
            raise InvalidArgument(
                f"{what} must be >= 1 (got {limit})",
                reason="KEY_LIMIT_INVALID",
                field=what.replace(" ", "_"),
            )
    with _locked_keys(path) as data:
        key = _new_entry(
            data,
            tenant_id,
            rate_per_s,
            burst,
            expires_at,
            tokens_per_minute,
            max_streams,
            max_queued_turns,
        )
        audit.record(
            path,
            "key-created",
            key_id=hash_key(key)[:KEY_ID_CHARS],
            tenant=tenant_id,
            expires_at=_iso(expires_at) if expires_at is not None else None,
        )
        return key


def _info(digest: str, entry: KeyEntry) -> KeyInfo:
    """What may be shown of a stored key: its id (a prefix of its hash) and settings."""
    return KeyInfo(
        digest[:KEY_ID_CHARS],
        entry.tenant_id,
        entry.created_at,
        entry.expires_at,
        entry.rate_per_s,
        entry.burst,
        entry.tokens_per_minute,
        entry.max_streams,
        entry.max_queued_turns,
    )


def list_keys(path: Path) -> list[KeyInfo]:
    """The stored keys by tenant, then creation: ids and settings, never secrets."""
    entries = parse_keys(_read_keys_json(path), source=str(path))
    infos = [_info(digest, entry) for digest, entry in entries.items()]
    return sorted(infos, key=lambda i: (i.tenant_id, i.created_at or 0.0, i.key_id))


def _find_key(data: Mapping[str, Any], key_id: str, path: Path) -> str:
    wanted = key_id.strip().lower()
    if not _KEY_ID.match(wanted):
        raise UnknownKeyError(
            f"{key_id!r} is not a key id: give at least 8 of the hex digits `mesh keys list` "
            "shows in its KEY ID column"
        )
    matches = [digest for digest in data if digest.startswith(wanted)]
    if not matches:
        raise UnknownKeyError(f"no key with id {wanted} in {path} (see `mesh keys list`)")
    if len(matches) > 1:
        raise UnknownKeyError(f"{wanted} matches {len(matches)} keys in {path}; give more digits")
    return matches[0]


def revoke_key(path: Path, key_id: str) -> KeyInfo:
    """Remove the key with this id (a unique prefix of its hash); return what it was."""
    with _locked_keys(path) as data:
        digest = _find_key(data, key_id, path)
        entry = parse_keys({digest: data[digest]}, source=str(path))[digest]
        del data[digest]
        audit.record(path, "key-revoked", key_id=digest[:KEY_ID_CHARS], tenant=entry.tenant_id)
    return _info(digest, entry)


def rotate_key(
    path: Path,
    key_id: str,
    *,
    expires_at: float | None = None,
    old_expires_at: float | None = None,
) -> tuple[str, KeyInfo]:
    """A new key for the tenant of key ``key_id``, with its limits; the old key keeps
    working until it is revoked, or until ``old_expires_at`` when given.

    Returns the new key (shown once) and the new key's info.
    """
    with _locked_keys(path) as data:
        old_digest = _find_key(data, key_id, path)
        old = parse_keys({old_digest: data[old_digest]}, source=str(path))[old_digest]
        key = _new_entry(
            data,
            old.tenant_id,
            old.rate_per_s,
            old.burst,
            expires_at,
            old.tokens_per_minute,
            old.max_streams,
            old.max_queued_turns,
        )
        if old_expires_at is not None:
            raw = data[old_digest]
            raw = {"tenant": raw} if isinstance(raw, str) else dict(raw)
            raw["expires_at"] = _iso(old_expires_at)
            data[old_digest] = raw
        audit.record(
            path,
            "key-rotated",
            key_id=hash_key(key)[:KEY_ID_CHARS],
            old_key_id=old_digest[:KEY_ID_CHARS],
            tenant=old.tenant_id,
            old_expires_at=_iso(old_expires_at) if old_expires_at is not None else None,
        )
    digest = hash_key(key)
    return key, KeyInfo(
        digest[:KEY_ID_CHARS],
        old.tenant_id,
        time.time(),
        expires_at,
        old.rate_per_s,
        old.burst,
        old.tokens_per_minute,
        old.max_streams,
        old.max_queued_turns,
    )


# -- rate limiting ------------------------------------------------------------------------------


class TokenBucket:
    """Classic token bucket: ``burst`` tokens, refilled at ``rate_per_s``."""

    __slots__ = ("rate_per_s", "burst", "_tokens", "_updated")

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._updated = now

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate_per_s)
        self._updated = now

    def try_take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; return 0.0 on success, else seconds until it would succeed."""
        self._refill(now)
        if self._tokens >= cost:
            self._tokens -= cost
            return 0.0
        return (cost - self._tokens) / self.rate_per_s

    def full(self, now: float) -> bool:
        self._refill(now)
        return self._tokens >= self.burst


class RateLimiter:
    """Token buckets per API key, counted on turn starts.

    Buckets live in a bounded LRU map; a bucket that is pushed out is full or nearly so in
    practice (it was idle longest), and a fresh bucket starts full, so eviction only forgives.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, principal: Principal) -> None:
        """Count one turn start for the principal's key; RESOURCE_EXHAUSTED when over its rate."""
        rate = principal.rate_per_s or self.rate_per_s
        burst = principal.burst or self.burst
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(principal.key_hash)
            if bucket is None or bucket.rate_per_s != rate or bucket.burst != burst:
                bucket = TokenBucket(rate, burst, now)
                self._buckets[principal.key_hash] = bucket
            self._buckets.move_to_end(principal.key_hash)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
            wait_s = bucket.try_take(now)
        if wait_s > 0:
            # Round up to whole milliseconds so a client retrying after exactly this long succeeds.
            retry_after = max(0.001, math.ceil(wait_s * 1000) / 1000)
            raise ResourceExhausted(
                f"rate limit of {rate:g} turns/s (burst {burst}) exceeded for this API key; "
                f"retry in {retry_after:.3f}s",
                reason="RATE_LIMITED",
                retry_after_s=retry_after,
                quota_subject=f"key:{principal.key_id}",
            )


# -- the interceptor ----------------------------------------------------------------------------

_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "mesh_principal", default=None
)


def current_principal() -> Principal:
    """The caller of the RPC being handled (set by ``AuthInterceptor``)."""
    principal = _PRINCIPAL.get()
    if principal is None:
        # Only reachable if a service forgot the interceptor: fail closed.
        raise Unauthenticated("request was not authenticated", reason="API_KEY_MISSING")
    return principal


@contextlib.contextmanager
def principal_scope(principal: Principal) -> Any:
    """Run a block as ``principal`` (what the interceptor does around each handler; for tests)."""
    token = _PRINCIPAL.set(principal)
    try:
        yield principal
    finally:
        # An async generator may be finalised in another context; the value dies with it anyway.
        with contextlib.suppress(ValueError):
            _PRINCIPAL.reset(token)


def _metadata_value(metadata: Sequence[tuple[str, Any]] | None, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


class AuthInterceptor(aio.ServerInterceptor):
    """Resolves ``x-api-key`` to a ``Principal`` and runs the handler with it set.

    A missing or unknown key aborts the RPC with UNAUTHENTICATED before the handler runs.
    """

    def __init__(
        self, keys: KeyStore, *, public_prefixes: Sequence[str] = DEFAULT_PUBLIC_PREFIXES
    ) -> None:
        self._keys = keys
        self._public_prefixes = tuple(public_prefixes)

    async def intercept_service(
        self,
        continuation: Any,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        # Typed as Any like mesh.interceptors: grpc's stubs describe sync-server handlers.
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if method.startswith(self._public_prefixes):
            return handler
        presented = _metadata_value(handler_call_details.invocation_metadata, API_KEY_HEADER)
        principal: Principal | None = None
        failure: MeshError | None = None
        try:
            principal = self._keys.resolve(presented)
        except MeshError as error:
            failure = error

        async def unary(
            run: Callable[[], Awaitable[Any]], ctx: aio.ServicerContext[Any, Any]
        ) -> Any:
            if principal is None:
                assert failure is not None
                await abort_with(ctx, failure)
                return None
            with principal_scope(principal):
                return await run()

        async def streaming(
            run: Callable[[], AsyncIterator[Any]], ctx: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            if principal is None:
                assert failure is not None
                await abort_with(ctx, failure)
                return
            with principal_scope(principal):
                async for item in run():
                    yield item

        return wrap_handler(handler, method, unary, streaming)


__all__ = [
    "API_KEY_HEADER",
    "AuthInterceptor",
    "KeyEntry",
    "KeyFileError",
    "KeyInfo",
    "KeyStore",
    "Principal",
    "RateLimiter",
    "TokenBucket",
    "UnknownKeyError",
    "add_key_to_file",
    "current_principal",
    "default_keys_file",
    "hash_key",
    "list_keys",
    "new_api_key",
    "parse_keys",
    "principal_scope",
    "revoke_key",
    "rotate_key",
    "validate_tenant_id",
]
