"""Conversation bookkeeping (engine/sessions.py): prefix reuse, LRU eviction, busy sequences."""

from __future__ import annotations

from tightwad.engine.sessions import ANONYMOUS_PREFIX, SessionTable
from tightwad.tokens import common_prefix


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_a_new_conversation_gets_a_free_sequence_and_keeps_nothing() -> None:
    table = SessionTable(2)
    plan = table.acquire("a", [1, 2, 3])
    assert plan is not None and plan.keep == 0 and plan.evicted is None and plan.slot.busy
    assert table.find("a") is plan.slot


def test_a_returning_conversation_keeps_the_shared_prefix_and_drops_the_rest() -> None:
    table = SessionTable(2)
    plan = table.acquire("a", [1, 2, 3, 4])
    assert plan is not None
    table.release(plan.slot, [1, 2, 3, 4], tail=[5])
    assert plan.slot.history == [1, 2, 3, 4, 5]
    again = table.acquire("a", [1, 2, 9, 9])
    assert again is not None and again.slot is plan.slot and again.keep == 2
    assert again.slot.tokens == [1, 2] and again.slot.tail == []


def test_min_pending_leaves_tokens_to_evaluate() -> None:
    table = SessionTable(1)
    plan = table.acquire("a", [1, 2, 3])
    assert plan is not None
    table.release(plan.slot, [1, 2, 3])
    again = table.acquire("a", [1, 2, 3], min_pending=1)
    assert again is not None and again.keep == 2


def test_a_busy_sequence_is_not_handed_out() -> None:
    table = SessionTable(1)
    assert table.acquire("a", [1]) is not None
    assert table.acquire("a", [1, 2]) is None  # its own request is still running
    assert table.acquire("b", [1]) is None  # nothing idle to evict


def test_lru_eviction_when_every_sequence_is_taken() -> None:
    table = SessionTable(2)
    for name in ("a", "b"):
        plan = table.acquire(name, [1, 2])
        assert plan is not None
        table.release(plan.slot, [1, 2])
    # touch "a" so that "b" is the least recently used
    plan = table.acquire("a", [1, 2, 3])
    assert plan is not None
    table.release(plan.slot, [1, 2, 3])
    plan = table.acquire("c", [7])
    assert plan is not None and plan.evicted == "b" and plan.keep == 0
    assert table.find("b") is None and table.was_evicted("b") and not table.was_evicted("a")
    # coming back un-evicts the name
    table.release(plan.slot, [7])
    back = table.acquire("b", [1, 2])
    assert back is not None and not table.was_evicted("b") and back.evicted == "a"


def test_anonymous_requests_reuse_the_longest_matching_prefix() -> None:
    table = SessionTable(3)
    for name, tokens in (("x", [1, 2, 3]), ("y", [1, 5, 6])):
        plan = table.acquire(ANONYMOUS_PREFIX + name, tokens)
        assert plan is not None
        table.release(plan.slot, tokens)
    assert [s.tokens for s in table.slots] == [[1, 2, 3], [1, 5, 6], []]  # y did not reuse x's cache
    plan = table.acquire(ANONYMOUS_PREFIX + "z", [1, 2, 3, 4], min_pending=1)
    assert plan is not None and plan.keep == 3 and plan.slot.seq == 0


def test_anonymous_sequences_are_evicted_before_named_conversations() -> None:
    table = SessionTable(2)
    named = table.acquire("named", [1])
    assert named is not None
    table.release(named.slot, [1])
    anon = table.acquire(ANONYMOUS_PREFIX + "1", [2])
    assert anon is not None
    table.release(anon.slot, [2])
    plan = table.acquire("other", [3])
    assert plan is not None and plan.slot is anon.slot and plan.evicted is None


def test_forget_and_held_tokens() -> None:
    table = SessionTable(2)
    plan = table.acquire("a", [1, 2, 3])
    assert plan is not None
    table.release(plan.slot, [1, 2, 3], tail=[4])
    assert table.held_tokens() == 3
    assert [s.conversation for s in table.idle_by_age()] == ["a"]
    table.forget(plan.slot, evicted=True)
    assert table.held_tokens() == 0 and table.was_evicted("a") and plan.slot.state is None
