"""The agent's fair queue and commit tracking, and the engine's sequence pool."""

from __future__ import annotations

from mesh.llm.kv import MIN_REUSE, SequencePool
from services.agent.scheduling import CommitTracker, FairQueue


def never_busy(conversation: str) -> bool:
    return False


def test_tenants_take_turns_while_each_keeps_its_order() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(20):
        queue.push("a", f"conv-a{i}", f"a{i}")
    queue.push("b", "conv-b", "b0")
    first = [queue.pop(never_busy) for _ in range(4)]
    assert [w.item for w in first if w] == ["a0", "b0", "a1", "a2"]
    assert len(queue) == 17


def test_a_tenant_arriving_during_a_burst_is_next() -> None:
    """Tenant a was just served; b's turn, pushed after, goes before a's next one."""
    queue: FairQueue[str] = FairQueue()
    for i in range(5):
        queue.push("a", f"conv-a{i}", f"a{i}")
    for _ in range(2):
        queue.pop(never_busy)
    queue.push("b", "conv-b", "b0")
    got = queue.pop(never_busy)
    assert got is not None and got.item == "b0"


def test_a_busy_conversation_waits_and_others_go_first() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a", "c1", "c1-turn2")
    queue.push("a", "c1", "c1-turn3")
    queue.push("a", "c2", "c2-turn1")
    got = queue.pop(lambda conversation: conversation == "c1")
    assert got is not None and got.item == "c2-turn1"
    assert queue.pop(lambda conversation: conversation == "c1") is None
    got = queue.pop(never_busy)
    assert got is not None and got.item == "c1-turn2"


def test_remove_if_takes_items_out() -> None:
    queue: FairQueue[int] = FairQueue()
    for i in range(6):
        queue.push(f"t{i % 2}", f"c{i}", i)
    assert queue.remove_if(lambda i: i % 3 == 0) == [0, 3]
    assert len(queue) == 4


def test_commits_only_the_finished_prefix() -> None:
    tracker = CommitTracker()
    for offset in (10, 11, 12, 13):
        tracker.taken(offset)
    assert tracker.finished(12) is None
    assert tracker.finished(11) is None
    assert tracker.finished(10) == 12
    assert list(tracker.unfinished()) == [13]
    assert tracker.finished(13) == 13
    assert tracker.finished(99) is None


def test_pool_reuses_the_longest_shared_prefix() -> None:
    pool = SequencePool(sequences=4, running=2, cells=1000)
    prompt = list(range(100))
    claim = pool.claim(prompt, 150)
    assert claim is not None and claim.keep == 0
    pool.release(claim.seq, prompt + [7, 8, 9])
    follow = prompt + [7, 8, 9, 500, 501]
    again = pool.claim(follow, 200)
    assert again is not None and again.seq == claim.seq and again.keep == 103
    # A prompt identical to the cached tokens still decodes its last token again.
    pool.release(again.seq, follow)
    same = pool.claim(follow, 200)
    assert same is not None and same.keep == len(follow) - 1


def test_pool_does_not_reuse_a_trivial_prefix() -> None:
    pool = SequencePool(sequences=4, running=1, cells=1000)
    claim = pool.claim([1] * 50, 60)
    assert claim is not None
    pool.release(claim.seq, [1] * 50)
    other = pool.claim([1] * (MIN_REUSE - 1) + [2] * 40, 60)
    assert other is not None and other.keep == 0 and other.seq != claim.seq


def test_pool_evicts_least_recently_used_idle_prefixes_for_room() -> None:
    pool = SequencePool(sequences=4, running=1, cells=300)
    for base in (1000, 2000, 3000):
        claim = pool.claim([base + i for i in range(100)], 100)
        assert claim is not None
        pool.release(claim.seq, [base + i for i in range(100)])
    assert pool.cached_tokens == 300
    claim = pool.claim([9000 + i for i in range(50)], 150)
    assert claim is not None
    # Two idle prefixes had to go, the oldest first (one of them the reused sequence itself).
    assert pool.used_cells <= 300
    assert pool.cached_tokens == 100


def test_pool_limits_running_sequences_and_room() -> None:
    pool = SequencePool(sequences=4, running=2, cells=200)
    assert pool.claim([1, 2, 3], 150) is not None
    assert pool.claim([4, 5, 6], 100) is None  # no room while the first runs
    assert pool.claim([4, 5, 6], 50) is not None
    assert pool.claim([7, 8, 9], 1) is None  # two running already
    assert pool.running == 2


def test_gateway_position_follows_the_agents_round_robin() -> None:
    from services.gateway.queue_position import Pending, fair_position

    # Offsets 10..29: tenant a's 20 turns; 30: tenant b's one; 31..32: a again.
    tenants = tuple((10 + i, "a") for i in range(20)) + ((30, "b"), (31, "a"), (32, "a"))
    pending = Pending(committed=10, end=33, tenants=tenants)
    assert fair_position(pending, 30, "b") == 1  # one of a's turns, not twenty
    assert fair_position(pending, 10, "a") == 0
    assert fair_position(pending, 13, "a") == 3  # a's own three ahead; b is behind it
    assert fair_position(pending, 31, "a") == 21  # all twenty of a's, and b's one
