"""Incremental text (engine/textstream.py): UTF-8 split across tokens, stops across tokens."""

from __future__ import annotations

from tightwad.engine.textstream import TextAssembler


def feed_all(assembler: TextAssembler, pieces: list[bytes]) -> list[str]:
    return [assembler.feed(p) for p in pieces] + [assembler.finish()]


def test_a_character_split_across_tokens_is_held_until_complete() -> None:
    coffee = "☕".encode()  # three bytes
    out = feed_all(TextAssembler(), [b"a", coffee[:1], coffee[1:2], coffee[2:] + b"b"])
    assert out == ["a", "", "", "☕b", ""]


def test_an_incomplete_character_at_the_end_becomes_a_replacement() -> None:
    out = feed_all(TextAssembler(), [b"x", "é".encode()[:1]])
    assert "".join(out) == "x\ufffd"


def test_a_stop_inside_one_token_cuts_the_text_there() -> None:
    a = TextAssembler(["END"])
    assert a.feed(b"hello END world") == "hello "
    assert a.stopped and a.feed(b"more") == "" and a.finish() == "" and a.text == "hello "


def test_a_stop_across_tokens_is_never_partly_emitted() -> None:
    a = TextAssembler(["<|stop|>"])
    out = [a.feed(p) for p in (b"one <|", b"st", b"op|> two")]
    assert out == ["one ", "", ""] and a.stopped and a.text == "one "


def test_a_false_start_is_released() -> None:
    a = TextAssembler(["abc"])
    assert a.feed(b"xab") == "x"
    assert a.feed(b"d") == "abd"
    assert a.finish() == ""


def test_the_earliest_of_several_stops_wins_and_held_text_is_flushed_at_the_end() -> None:
    a = TextAssembler(["zz", "y"])
    assert a.feed(b"az") == "a"
    assert a.finish() == "z"
    b = TextAssembler(["zz", "y"])
    assert b.feed(b"a zz y") == "a "


def test_a_stop_spanning_a_multibyte_character() -> None:
    a = TextAssembler(["é!"])
    e = "é".encode()
    assert [a.feed(p) for p in (b"caf", e[:1], e[1:], b"!")] == ["caf", "", "", ""]
    assert a.stopped and a.text == "caf"


def test_stop_lists_are_bounded_with_a_400_naming_stop() -> None:
    import pytest

    from tightwad.openai import InvalidRequest
    from tightwad.stops import MAX_STOP_CHARS, MAX_STOPS, parse_stops

    assert parse_stops(None) == [] and parse_stops("x") == ["x"] and parse_stops(["a", ""]) == ["a"]
    for bad in (["s"] * (MAX_STOPS + 1), "x" * (MAX_STOP_CHARS + 1), [1], 5):
        with pytest.raises(InvalidRequest, match="`stop`") as info:
            parse_stops(bad)
        assert info.value.param == "stop"


def test_matching_the_longest_allowed_stops_stays_cheap() -> None:
    import time

    from tightwad.stops import MAX_STOP_CHARS, MAX_STOPS

    # The worst case for holding text back: every stop is a run of one character.
    stops = ["a" * (MAX_STOP_CHARS - i) + "b" for i in range(MAX_STOPS)]
    assembler = TextAssembler(stops)
    start = time.perf_counter()
    for _ in range(200):
        assembler.feed(b"a")
    per_token = (time.perf_counter() - start) / 200
    assert not assembler.stopped and per_token < 0.002, f"{per_token * 1e3:.2f} ms per token"
