"""API keys, the key store and the per-key rate limiter (no servers)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from mesh.auth import (
    KeyEntry,
    KeyFileError,
    KeyStore,
    Principal,
    RateLimiter,
    TokenBucket,
    add_key_to_file,
    current_principal,
    default_keys_file,
    hash_key,
    new_api_key,
    parse_keys,
    principal_scope,
)
from mesh.errors import InvalidArgument, ResourceExhausted, Unauthenticated


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hash_is_sha256_hex() -> None:
    assert hash_key("secret") == hashlib.sha256(b"secret").hexdigest()


def test_new_keys_are_random_and_prefixed() -> None:
    keys = {new_api_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(key.startswith("mk_") and len(key) > 40 for key in keys)


def test_default_keys_file_follows_env(tmp_path: Path) -> None:
    explicit = tmp_path / "k.json"
    assert default_keys_file({"MESH_GATEWAY_API_KEYS_FILE": str(explicit)}) == explicit
    assert default_keys_file({"MESH_STATE_DIR": str(tmp_path)}) == tmp_path / "api-keys.json"


def test_parse_keys_accepts_both_entry_forms() -> None:
    digest_a, digest_b = hash_key("a"), hash_key("b")
    entries = parse_keys(
        {digest_a: "acme", digest_b: {"tenant": "globex", "rate_per_s": 2, "burst": 3}}
    )
    assert entries[digest_a] == KeyEntry("acme")
    assert entries[digest_b] == KeyEntry("globex", 2.0, 3)


def test_a_key_may_carry_its_own_token_budget(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    plain = add_key_to_file(path, "acme")
    budgeted = add_key_to_file(
        path, "acme", tokens_per_minute=500, max_streams=3, max_queued_turns=2
    )
    stored = json.loads(path.read_text())
    assert stored[hash_key(budgeted)]["tokens_per_minute"] == 500
    assert stored[hash_key(budgeted)]["max_streams"] == 3
    assert stored[hash_key(budgeted)]["max_queued_turns"] == 2
    # Older readers see no change in a key without limits of its own.
    assert set(stored[hash_key(plain)]) == {"tenant", "created_at"}
    store = KeyStore(path)
    principal = store.resolve(budgeted)
    assert (principal.tokens_per_minute, principal.max_streams) == (500, 3)
    assert principal.max_queued_turns == 2
    assert store.resolve(plain).tokens_per_minute is None
    assert store.resolve(plain).max_streams is None
    with pytest.raises(InvalidArgument):
        add_key_to_file(path, "acme", tokens_per_minute=0)
    with pytest.raises(InvalidArgument):
        add_key_to_file(path, "acme", max_streams=0)
    with pytest.raises(InvalidArgument):
        add_key_to_file(path, "acme", max_queued_turns=0)


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"not-a-digest": "acme"},
        {hash_key("a"): ""},
        {hash_key("a"): "bad tenant!"},
        {hash_key("a"): {"tenant": "acme", "rate_per_s": 0}},
        {hash_key("a"): {"tenant": "acme", "burst": 0}},
        {hash_key("a"): {"tenant": "acme", "burst": True}},
        {hash_key("a"): {"tenant": "acme", "tokens_per_minute": 0}},
        {hash_key("a"): {"tenant": "acme", "tokens_per_minute": 2.5}},
        {hash_key("a"): {"tenant": "acme", "tokens_per_minute": "100"}},
        {hash_key("a"): {"tenant": "acme", "max_streams": 0}},
        {hash_key("a"): {"tenant": "acme", "max_streams": False}},
        {hash_key("a"): {"tenant": "acme", "max_queued_turns": -1}},
        {hash_key("a"): 7},
    ],
)
def test_parse_keys_rejects_malformed_files(data: object) -> None:
    with pytest.raises(KeyFileError):
        parse_keys(data)


def test_resolve_missing_invalid_and_valid_keys() -> None:
    store = KeyStore(entries={hash_key("good"): KeyEntry("acme", 3.0, 4)})
    with pytest.raises(Unauthenticated) as missing:
        store.resolve(None)
    assert missing.value.reason == "API_KEY_MISSING"
    with pytest.raises(Unauthenticated) as empty:
        store.resolve("")
    assert empty.value.reason == "API_KEY_MISSING"
    with pytest.raises(Unauthenticated) as invalid:
        store.resolve("bad")
    assert invalid.value.reason == "API_KEY_INVALID"
    with pytest.raises(Unauthenticated) as huge:
        store.resolve("x" * 10_000)
    assert huge.value.reason == "API_KEY_INVALID"
    principal = store.resolve("good")
    assert principal == Principal("acme", hash_key("good"), 3.0, 4)
    assert principal.key_id == hash_key("good")[:12]


def test_key_file_round_trip_stores_only_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "state" / "api-keys.json"
    key = add_key_to_file(path, "acme")
    second = add_key_to_file(path, "globex", rate_per_s=1.5, burst=2)
    text = path.read_text()
    assert key not in text and second not in text
    data = json.loads(text)
    assert data[hash_key(key)]["tenant"] == "acme"
    assert data[hash_key(second)]["rate_per_s"] == 1.5
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    store = KeyStore(path)
    assert store.resolve(key).tenant_id == "acme"
    assert store.resolve(second).rate_per_s == 1.5


def test_add_key_rejects_bad_tenant(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        add_key_to_file(tmp_path / "k.json", "no spaces allowed")
    assert not (tmp_path / "k.json").exists()


def test_store_picks_up_new_keys_and_survives_broken_edits(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "keys.json"
    store = KeyStore(path, check_interval_s=1.0, clock=clock)  # missing file: no keys yet
    assert len(store) == 0
    key = add_key_to_file(path, "acme")
    clock.now += 2
    assert store.resolve(key).tenant_id == "acme"
    path.write_text("{ not json")
    clock.now += 2
    # A broken edit keeps the last good keys instead of locking everyone out.
    assert store.resolve(key).tenant_id == "acme"


def test_store_refuses_a_broken_file_at_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("[1, 2]")
    with pytest.raises(KeyFileError):
        KeyStore(path)


def test_principal_scope_sets_and_resets() -> None:
    with pytest.raises(Unauthenticated):
        current_principal()
    principal = Principal("acme", hash_key("k"))
    with principal_scope(principal):
        assert current_principal() is principal
    with pytest.raises(Unauthenticated):
        current_principal()


def test_token_bucket_refills_at_rate() -> None:
    bucket = TokenBucket(2.0, 3, now=0.0)
    assert [bucket.try_take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take(0.0) == pytest.approx(0.5)
    assert bucket.try_take(0.25) == pytest.approx(0.25)
    assert bucket.try_take(0.5) == 0.0
    assert not bucket.full(0.5)
    assert bucket.full(10.0)


def test_rate_limiter_exhausts_with_retry_info() -> None:
    clock = FakeClock()
    limiter = RateLimiter(5.0, 10, clock=clock)
    principal = Principal("acme", hash_key("k"))
    for _ in range(10):
        limiter.acquire(principal)
    with pytest.raises(ResourceExhausted) as exhausted:
        limiter.acquire(principal)
    assert exhausted.value.reason == "RATE_LIMITED"
    assert exhausted.value.quota_subject == f"key:{principal.key_id}"
    assert exhausted.value.retry_after_s == pytest.approx(0.2)
    # Another key has its own bucket.
    limiter.acquire(Principal("acme", hash_key("other")))
    clock.now += 0.2
    limiter.acquire(principal)
    with pytest.raises(ResourceExhausted):
        limiter.acquire(principal)


def test_rate_limiter_honours_per_key_limits() -> None:
    clock = FakeClock()
    limiter = RateLimiter(100.0, 100, clock=clock)
    slow = Principal("acme", hash_key("slow"), rate_per_s=1.0, burst=1)
    limiter.acquire(slow)
    with pytest.raises(ResourceExhausted) as exhausted:
        limiter.acquire(slow)
    assert exhausted.value.retry_after_s == pytest.approx(1.0)


def test_rate_limiter_bounds_its_memory() -> None:
    limiter = RateLimiter(1.0, 1, max_keys=10, clock=FakeClock())
    for index in range(100):
        limiter.acquire(Principal("acme", hash_key(str(index))))
    assert len(limiter._buckets) == 10
