"""``redact_dsn`` hides passwords in every DSN form PostgreSQL accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from mesh.infra.postgres import make_dsn, redact_dsn


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (
            "postgresql://mesh:s3cret@127.0.0.1:5432/mesh?connect_timeout=10",
            "postgresql://mesh:***@127.0.0.1:5432/mesh?connect_timeout=10",
        ),
        ("postgres://mesh:s3cret@db.internal/mesh", "postgres://mesh:***@db.internal/mesh"),
        ("POSTGRES://mesh:s3cret@db/mesh", "POSTGRES://mesh:***@db/mesh"),
        # An unquoted '@' in the password: everything up to the host's '@' goes.
        ("postgres://mesh:p@ss@db:5432/mesh", "postgres://mesh:***@db:5432/mesh"),
        ("postgresql://mesh@db/mesh", "postgresql://mesh@db/mesh"),
        (
            "postgresql://db/mesh?user=mesh&password=s3cret&sslmode=require",
            "postgresql://db/mesh?user=mesh&password=***&sslmode=require",
        ),
        (
            "host=db port=5432 user=mesh password=s3cret dbname=mesh",
            "host=db port=5432 user=mesh password=*** dbname=mesh",
        ),
        ("host=db password = 's3 cr''et' dbname=mesh", "host=db password = *** dbname=mesh"),
        ("host=db PASSWORD='a\\'b' dbname=mesh", "host=db PASSWORD=*** dbname=mesh"),
        ("host=/tmp dbname=mesh", "host=/tmp dbname=mesh"),
    ],
)
def test_passwords_are_hidden(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


def test_a_made_dsn_never_shows_its_password() -> None:
    dsn = make_dsn("p@ss:w/rd 'x'", 5432)
    assert "p%40ss" in dsn
    redacted = redact_dsn(dsn)
    assert "p%40ss" not in redacted and "***" in redacted


def test_a_tls_dsn_verifies_the_server_and_still_hides_its_password(tmp_path: Path) -> None:
    ca = tmp_path / "my certs" / "ca.pem"
    dsn = make_dsn("s3cret", 5432, ca=ca)
    assert "sslmode=verify-full" in dsn and "sslrootcert=" in dsn
    redacted = redact_dsn(dsn)
    assert "s3cret" not in redacted and "***" in redacted
    # The CA path survives redaction, and psycopg reads it back from the query.
    assert conninfo_to_dict(redacted)["sslrootcert"] == str(ca)
    assert conninfo_to_dict(dsn)["password"] == "s3cret"
