"""Pure parts of the PostgreSQL store: query terms, vector literals, argument checks."""

from __future__ import annotations

import pytest

from mesh.memory.postgres import PostgresMemoryStore, _query_words, _vector_literal, _version_tuple


def test_query_words_are_deduplicated_and_stripped_of_operators() -> None:
    assert _query_words('What is the "door code"? -lab OR lab') == [
        "what",
        "is",
        "the",
        "door",
        "code",
        "lab",
    ]
    assert _query_words("?!") == []
    assert len(_query_words(" ".join(f"w{i}" for i in range(500)))) == 64


def test_vector_literal_checks_shape_and_values() -> None:
    assert _vector_literal([0.5, -0.25, 1.0], 3) == "[0.5,-0.25,1]"
    with pytest.raises(ValueError, match="shape"):
        _vector_literal([0.1, 0.2], 3)
    with pytest.raises(ValueError, match="NaN"):
        _vector_literal([0.1, float("nan"), 0.3], 3)


def test_version_parsing() -> None:
    assert _version_tuple("0.6.2") == (0, 6, 2)
    assert _version_tuple("0.8.0") >= (0, 8)
    assert _version_tuple("1.0.0-rc1") == (1, 0, 0)


@pytest.mark.parametrize(
    "kwargs",
    [{"dims": 0}, {"table": "Robert'); DROP TABLE x;--"}, {"text_config": "german"}],
)
def test_constructor_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PostgresMemoryStore("postgresql:///nowhere", **kwargs)  # type: ignore[arg-type]


async def test_calls_before_start_fail_clearly() -> None:
    store = PostgresMemoryStore("postgresql:///nowhere")
    with pytest.raises(RuntimeError, match="not started"):
        await store.has_source("t", "s")


async def test_empty_tenant_is_refused_by_the_store_itself() -> None:
    store = PostgresMemoryStore("postgresql:///nowhere")
    with pytest.raises(ValueError, match="tenant_id"):
        await store.search("", "q", [0.0] * 256, 5)
    with pytest.raises(ValueError, match="tenant_id"):
        await store.delete("")
