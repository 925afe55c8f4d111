import pytest

from mesh.errors import InvalidArgument
from mesh.turn_ids import new_turn_ref, parse_turn_id


def test_round_trip() -> None:
    ref = new_turn_ref(3, 120, 4567)
    assert parse_turn_id(str(ref)) == ref


@pytest.mark.parametrize(
    "bad", ["", "t1.2.3", "x1.2.3.0123456789abcdef", "t1.2.3.XYZ", "t-1.2.3.0123456789abcdef"]
)
def test_malformed_ids_are_invalid_argument(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_turn_id(bad)
