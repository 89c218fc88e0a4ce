"""The verify API contract (tightwad.verify_api): what the engine decodes is what the proxy encoded,
and back; its errors are matched by code."""

from __future__ import annotations

import numpy as np
import pytest

from tightwad.openai import InvalidRequest, OpenAIError, UpstreamError
from tightwad.verify_api import (
    VERIFY_PATH,
    ConversationEvicted,
    Draft,
    Sampling,
    VerifyReply,
    VerifyRequest,
    decode_error,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)


def test_a_request_survives_the_wire() -> None:
    request = VerifyRequest(
        "c1",
        [1, 2, 3],
        [Draft((4, 5), ({"ids": [4], "p": [1.0]}, [0.5, 0.5, 0.0, 0.0, 0.0, 0.0])), Draft((7,))],
        Sampling(temperature=0.7, top_k=5, top_p=0.9, seed=42),
        reset=True,
    )
    assert decode_request(encode_request(request)) == request
    assert VERIFY_PATH == "/tightwad/v1/verify"


def test_a_reply_survives_the_wire() -> None:
    reply = VerifyReply(
        [4, 9], 1, draft_index=1, eog=True, accepted_per_draft=[0, 1], n_past=7, pieces=[b"\xe2", b"!"]
    )
    body = encode_reply(reply)
    assert body["object"] == "tightwad.verify" and body["n_accepted"] == 1
    assert decode_reply(body) == reply


def test_an_absent_sampling_is_greedy_and_bad_sampling_is_a_400() -> None:
    assert decode_request({"conversation": "c"}).sampling.greedy
    with pytest.raises(InvalidRequest, match="temperature"):
        decode_request({"conversation": "c", "sampling": {"temperature": -1}})
    with pytest.raises(InvalidRequest, match="top_k"):
        Sampling.from_json({"top_k": True})


def test_malformed_requests_name_the_field() -> None:
    with pytest.raises(InvalidRequest, match=r"drafts\[0\]\.tokens"):
        decode_request({"drafts": [{"tokens": ["a"]}]})
    with pytest.raises(InvalidRequest, match="`tokens`"):
        decode_request({"tokens": 5})
    with pytest.raises(InvalidRequest, match="drafts"):
        decode_request({"drafts": "x"})


def test_drafter_rows_become_one_normalised_array() -> None:
    draft = Draft((1, 2), ({"ids": [1, 2], "p": [1.0, 3.0]}, [0.0, 0.0, 2.0, 2.0]))
    dense = draft.dense_probs(4, "drafts[0].probs")
    assert dense is not None and np.allclose(dense, [[0, 0.25, 0.75, 0], [0, 0, 0.5, 0.5]])
    assert Draft((1,)).dense_probs(4, "p") is None
    for bad in ([[0.5, 0.5]], [{"ids": [9], "p": [1.0]}], [[0.0, 0.0, 0.0, 0.0]], [[-1.0, 1.0, 1.0, 1.0]]):
        with pytest.raises(InvalidRequest):
            Draft((1,), tuple(bad)).dense_probs(4, "p")


def test_an_evicted_conversation_is_its_own_error_by_code() -> None:
    body = ConversationEvicted("conversation 'c' was evicted; send it again with reset: true").to_json()
    error = decode_error(409, body, "verify failed")
    assert isinstance(error, ConversationEvicted) and "reset: true" in str(error)
    other = decode_error(400, {"error": {"message": "no", "type": "invalid_request_error", "code": "x"}}, "f")
    assert type(other) is OpenAIError and other.status == 400 and other.code == "x"


def test_a_reply_from_another_version_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="verify API v1"):
        decode_reply({"tokens": [1], "accepted": 0, "eog": False})


def test_a_negative_seed_maps_to_a_64_bit_stream_and_an_out_of_range_one_is_a_400() -> None:
    # -1 (what llama.cpp clients send) must never reach numpy as a negative seed: it is mapped onto
    # the same 64-bit value every time, so it stays reproducible.
    assert Sampling(temperature=0.8, seed=-1).rng_seed == 2**64 - 1
    assert Sampling(temperature=0.8, seed=7).rng_seed == 7 and Sampling().rng_seed is None
    np.random.default_rng(Sampling(seed=-(2**63)).rng_seed)
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(InvalidRequest, match="seed") as info:
            Sampling.from_json({"temperature": 1.0, "seed": bad})
        assert info.value.param == "seed"


def test_a_temperature_too_small_to_divide_by_is_greedy() -> None:
    assert Sampling(temperature=1e-308).greedy and Sampling(temperature=1e-6).greedy
    assert not Sampling(temperature=0.01).greedy


def test_drafter_rows_are_checked_without_building_a_tokens_by_vocabulary_array() -> None:
    import tracemalloc

    n_vocab, n = 49152, 500
    body = {
        "conversation": "c",
        "drafts": [{"tokens": [1] * n, "probs": [{"ids": [1], "p": [1.0]} for _ in range(n)]}],
    }
    tracemalloc.start()
    try:
        draft = decode_request(body).drafts[0]
        rows = draft.prob_rows(n_vocab, "drafts[0].probs")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows is not None and len(rows) == n
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB to check {n} one-entry rows"
    assert rows[3][1] == 1.0 and rows[3].sum() == 1.0 and rows[3].shape == (n_vocab,)


def test_a_sparse_row_larger_than_the_vocabulary_is_refused_before_it_is_read() -> None:
    row = {"ids": list(range(5)), "p": [1.0] * 5}
    with pytest.raises(InvalidRequest, match=r"drafts\[0\]\.probs\[0\]"):
        Draft((1,), (row,)).prob_rows(4, "drafts[0].probs")
    with pytest.raises(InvalidRequest, match="finite"):
        Draft((1,), ({"ids": [1, 2], "p": [1.0, float("nan")]},)).prob_rows(4, "p")
