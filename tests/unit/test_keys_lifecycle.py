"""API keys with a lifecycle: list, revoke, rotate, expiry, and loud broken edits."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from mesh.auth import (
    KeyFileError,
    KeyStore,
    Principal,
    UnknownKeyError,
    add_key_to_file,
    hash_key,
    list_keys,
    parse_keys,
    revoke_key,
    rotate_key,
)
from mesh.cli import main
from mesh.errors import Unauthenticated


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, environ={}, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def bump(path: Path) -> None:
    """Make a rewrite visible to the store even within one mtime tick."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_revoked_key_is_refused_for_new_calls_and_by_verify(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = add_key_to_file(path, "acme")
    other = add_key_to_file(path, "acme")
    mono = Clock(0.0)
    store = KeyStore(path, clock=mono)
    principal = store.resolve(key)
    store.verify(principal)
    revoked = revoke_key(path, principal.key_id)
    assert (revoked.key_id, revoked.tenant_id) == (principal.key_id, "acme")
    bump(path)
    mono.now += 2
    with pytest.raises(Unauthenticated) as error:
        store.verify(principal)
    assert error.value.reason == "API_KEY_REVOKED" and principal.key_id in error.value.message
    with pytest.raises(Unauthenticated) as error:
        store.resolve(key)
    assert error.value.reason == "API_KEY_INVALID"
    assert store.resolve(other).tenant_id == "acme"  # the tenant's other key is untouched


def test_expired_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    wall = Clock(time.time())
    key = add_key_to_file(path, "acme", expires_at=wall.now + 60)
    store = KeyStore(path, wall_clock=wall)
    principal = store.resolve(key)
    wall.now += 61
    for attempt in (lambda: store.resolve(key), lambda: store.verify(principal)):
        with pytest.raises(Unauthenticated) as error:
            attempt()
        assert error.value.reason == "API_KEY_EXPIRED"
        assert "expired at" in error.value.message and "mesh keys rotate" in error.value.message


def test_verify_refuses_a_key_that_changed_tenant(tmp_path: Path) -> None:
    digest = hash_key("k")
    store = KeyStore(entries=parse_keys({digest: "globex"}))
    with pytest.raises(Unauthenticated):
        store.verify(Principal("acme", digest))


def test_rotate_adds_a_key_and_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    old = add_key_to_file(
        path, "acme", rate_per_s=2.0, burst=3, tokens_per_minute=900, max_streams=5
    )
    old_id = hash_key(old)[:12]
    new, info = rotate_key(path, old_id[:8])
    store = KeyStore(path)
    assert store.resolve(old).tenant_id == "acme"
    fresh = store.resolve(new)
    assert (fresh.tenant_id, fresh.rate_per_s, fresh.burst) == ("acme", 2.0, 3)
    assert fresh.tokens_per_minute == info.tokens_per_minute == 900
    assert fresh.max_streams == info.max_streams == 5
    assert info.key_id == fresh.key_id != old_id
    assert {i.key_id for i in list_keys(path)} == {old_id, fresh.key_id}
    # With a grace period the old key gets an expiry; the new one has none.
    rotate_key(path, fresh.key_id, old_expires_at=time.time() + 3600)
    by_id = {i.key_id: i for i in list_keys(path)}
    assert by_id[fresh.key_id].expires_at is not None and by_id[old_id].expires_at is None


def test_key_ids_must_be_unique_and_known(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    add_key_to_file(path, "acme")
    for bad, words in (("zz", "not a key id"), ("0" * 12, "no key with id")):
        with pytest.raises(UnknownKeyError) as error:
            revoke_key(path, bad)
        assert words in str(error.value)
    data = {("ab" * 32): "acme", ("ab" * 31 + "cd"): "acme"}
    path.write_text(json.dumps(data))
    with pytest.raises(UnknownKeyError, match="matches 2 keys"):
        revoke_key(path, "abababab")
    assert len(list_keys(path)) == 2  # nothing was removed


def test_malformed_edit_is_logged_counted_and_the_last_good_keys_stay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.json"
    key = add_key_to_file(path, "acme")
    mono = Clock(0.0)
    store = KeyStore(path, clock=mono, service="test-keys")

    def metric(name: str) -> float:
        value = REGISTRY.get_sample_value(name, {"service": "test-keys"})
        return 0.0 if value is None else value

    before = metric("mesh_api_keys_file_errors_total")
    assert metric("mesh_api_keys_file_valid") == 1
    data = json.loads(path.read_text())
    data[hash_key(key)]["expires_at"] = "next tuesday"
    path.write_text(json.dumps(data))
    bump(path)
    mono.now += 2
    with caplog.at_level(logging.ERROR, logger="mesh.auth"):
        assert store.resolve(key).tenant_id == "acme"
        mono.now += 2
        store.resolve(key)  # the same broken file is reported once, not every second
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "malformed" in errors[0].getMessage()
    assert "expires_at" in errors[0].getMessage()
    assert metric("mesh_api_keys_file_errors_total") == before + 1
    assert metric("mesh_api_keys_file_valid") == 0
    assert store.last_error is not None and "ISO 8601" in store.last_error
    # Fixed: loaded again, and the gauge says so.
    del data[hash_key(key)]["expires_at"]
    path.write_text(json.dumps(data))
    bump(path)
    mono.now += 2
    store.resolve(key)
    assert store.last_error is None and metric("mesh_api_keys_file_valid") == 1
    with pytest.raises(KeyFileError):  # at start a broken file is a configuration error
        path.write_text("{")
        KeyStore(path)


def test_cli_lifecycle_never_shows_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    file = ["--file", str(path)]
    code, out, err = run(["keys", "create", "--tenant", "acme", "--expires-in", "30d", *file])
    assert code == 0 and "valid until" in err
    first = out.strip()
    code, out, _ = run(["keys", "list", *file])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["KEY", "ID"]
    first_id = hash_key(first)[:12]
    assert lines[1].split()[:2] == [first_id, "acme"] and "active" in lines[1]
    assert first not in out and hash_key(first) not in out

    code, out, err = run(["keys", "rotate", first_id, "--old-expires-in", "1h", *file])
    assert code == 0 and out.startswith("mk_") and "stops working at" in err
    second = out.strip()
    store = KeyStore(path)
    assert store.resolve(first).tenant_id == store.resolve(second).tenant_id == "acme"

    code, _, err = run(["keys", "revoke", first_id, *file])
    assert code == 0 and first_id in err
    code, out, _ = run(["keys", "list", "--tenant", "acme", *file])
    assert first_id not in out and hash_key(second)[:12] in out
    code, out, _ = run(["keys", "list", "--tenant", "globex", *file])
    assert len(out.splitlines()) == 1

    code, _, err = run(["keys", "revoke", first_id, *file])
    assert code == 1 and err.startswith("error: no key with id") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        run(["keys", "create", "--tenant", "acme", "--expires-in", "soon", *file])
    code, _, err = run(
        ["keys", "create", "--tenant", "acme", "--expires-at", "2001-01-01T00:00:00", *file]
    )
    assert code == 1 and "in the past" in err


def test_cli_list_marks_expired_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    add_key_to_file(path, "acme", expires_at=time.time() - 5)
    code, out, _ = run(["keys", "list", "--file", str(path)])
    assert code == 0 and "expired" in out.splitlines()[1]
