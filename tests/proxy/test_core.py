"""The proxy's pure core: cost model, estimates, the K policy, stop matching, detokenizing, the
n-gram drafter, draft sanitising, request parsing, conversation reuse and manifest config."""

from __future__ import annotations

import asyncio

import pytest
from support import ROOT

from tightwad.errors import TightwadError
from tightwad.manifest import load_manifest
from tightwad.openai import InvalidRequest
from tightwad.proxy.config import ProxyConfig, from_manifest
from tightwad.proxy.conversations import ConversationPool
from tightwad.proxy.detok import TextStream, Vocabulary
from tightwad.proxy.drafters.base import DrafterError, DraftRequest, Proposal
from tightwad.proxy.drafters.guard import GuardedDrafter, sanitise
from tightwad.proxy.drafters.llama_server import LlamaServerDrafter, parse_completion
from tightwad.proxy.drafters.ngram import prompt_lookup
from tightwad.proxy.kpolicy import costmodel
from tightwad.proxy.kpolicy.controller import KController, KPolicy
from tightwad.proxy.kpolicy.costmodel import Costs, choose, expected_tokens
from tightwad.proxy.kpolicy.estimates import Acceptance, Line, LineFit
from tightwad.proxy.request_parsing import parse_params, parse_prompt, passthrough_reason
from tightwad.stops import StopMatcher
from tightwad.verify_api import Sampling


# cost model -------------------------------------------------------------------------------------
def costs(**kw: float) -> Costs:
    base = dict(
        acceptance=0.8,
        draft_fixed=0.002,
        draft_per_token=0.005,
        verify_fixed=0.050,
        verify_per_token=0.004,
        rtt=0.001,
        baseline_rate=1 / 0.050,
    )
    return Costs(**{**base, **kw})  # type: ignore[arg-type]


def test_expected_tokens_is_leviathans_formula() -> None:
    assert expected_tokens(0.0, 5) == 1.0  # nothing accepted: only the target's own token
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)
    assert expected_tokens(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2)
    assert 7.5 < expected_tokens(1.0, 7) < 8.0  # α is capped just below 1: close to K + 1
    assert expected_tokens(0.9, 0) == 1.0


def test_choice_picks_the_k_that_maximises_tokens_per_second() -> None:
    c = costs()
    choice = choose(c, k_max=16)
    best = max(range(1, 17), key=lambda k: costmodel.rate(c, k))
    assert choice.k == best and choice.speculate
    assert choice.speedup == pytest.approx(costmodel.rate(c, best) * 0.050)
    # Better drafters draft longer; a slower draft per token drafts shorter.
    assert choose(costs(acceptance=0.95), 16).k > choice.k
    assert choose(costs(draft_per_token=0.02), 16).k < choice.k


def test_speculation_turns_off_when_it_cannot_win() -> None:
    # A poor drafter: almost nothing accepted.
    assert choose(costs(acceptance=0.05), 16).k == 0
    # A drafter as slow as the target itself.
    assert choose(costs(draft_per_token=0.05), 16).k == 0
    # A fixed K is honoured while it wins, and still turned off when it loses.
    assert choose(costs(), 16, fixed_k=3).k == 3
    assert choose(costs(acceptance=0.05), 16, fixed_k=3).k == 0


def test_the_network_term_favours_longer_drafts() -> None:
    near = choose(costs(rtt=0.0005), 32)
    far = choose(costs(rtt=0.040), 32)
    assert far.k >= near.k
    assert costmodel.round_time(costs(rtt=0.040), 4) == pytest.approx(0.002 + 0.020 + 0.050 + 0.016 + 0.040)


def test_pipelining_hides_the_draft_when_the_whole_draft_is_accepted() -> None:
    plain, piped = costs(acceptance=0.9), costs(acceptance=0.9, pipelined=True)
    assert costmodel.round_time(piped, 4) < costmodel.round_time(plain, 4)
    # With nothing accepted the pipelined draft is always dropped: no gain.
    assert costmodel.round_time(costs(acceptance=0.0, pipelined=True), 4) == pytest.approx(
        costmodel.round_time(costs(acceptance=0.0), 4)
    )


# estimates --------------------------------------------------------------------------------------
def test_acceptance_estimate_follows_the_geometric_model() -> None:
    a = Acceptance(prior=0.5, prior_weight=0.001)
    for _ in range(50):
        a.add(4, 4)  # all accepted: successes only
        a.add(4, 2)  # 2 accepted, then a rejection
    assert a.alpha == pytest.approx(6 / 7, abs=0.01)


def test_line_fit_recovers_cost_per_token_and_keeps_the_prior_shape_without_spread() -> None:
    fit = LineFit(Line(0, 0), ratio=0.1)
    for k in (1, 2, 4, 8, 1, 2, 4, 8):
        fit.add(k, 0.050 + 0.004 * k)
    line = fit.line()
    assert line.intercept == pytest.approx(0.050, rel=1e-6) and line.slope == pytest.approx(0.004, rel=1e-6)
    flat = LineFit(Line(0, 0), ratio=0.1)
    flat.add(4, 0.14)  # one K only: y = a(1 + 0.1·4)
    assert flat.line().intercept == pytest.approx(0.1) and flat.line().slope == pytest.approx(0.01)


# the policy -------------------------------------------------------------------------------------
def feed(c: KController, rounds: int, accepted: float, draft_per_token: float, verify: float = 0.05) -> None:
    for i in range(rounds):
        k = c.next_k() or 4
        n = round(accepted * k) if i % 2 else k
        c.record_round(k, n, verify + 0.004 * k)
        c.record_draft(k, 0.001 + draft_per_token * k)
        if c.off:
            return


def test_controller_drafts_while_it_pays() -> None:
    c = KController(KPolicy(k_max=16))
    assert c.next_k() == 4  # nothing measured yet
    feed(c, 40, accepted=0.9, draft_per_token=0.004)
    assert not c.off and c.next_k() > 1


def test_controller_switches_off_for_a_bad_drafter_and_probes_later_with_growing_gaps() -> None:
    c = KController(KPolicy(k_max=16, probe_after=32, probe_rounds=2, max_probe_after=128))
    c.record_engine(33, 32, 32 * 0.02)  # the target alone: 50 tok/s, faster than any round here
    feed(c, 40, accepted=0.0, draft_per_token=0.02)
    assert c.off and c.next_k() == 0 and c.off_chunk() == 32
    c.record_engine(32, 31, 31 * 0.02)  # served 32 tokens alone: time to probe
    probes = [c.next_k(), c.next_k()]
    assert all(k > 0 for k in probes)
    for k in probes:
        c.record_round(k, 0, 0.05 + 0.004 * k)
        c.record_draft(k, 0.02 * k)
    assert c.off and c.off_chunk() == 64  # the probe confirmed it: the next gap doubles
    c.record_engine(64, 63, 63 * 0.02)
    assert c.next_k() > 0  # probing again


def test_controller_keeps_a_fixed_k() -> None:
    c = KController(KPolicy(fixed_k=6))
    feed(c, 20, accepted=0.9, draft_per_token=0.002)
    assert c.next_k() == 6


# stops and text ---------------------------------------------------------------------------------
def test_stop_across_pieces_never_emits_past_it() -> None:
    m = StopMatcher(["</answer>", "\n\n"])
    out = [m.feed(p) for p in ["The ans", "wer is 4", "2</ans", "wer> and more"]]
    assert "".join(out) == "The answer is 42" and m.stopped
    assert out[2] == "2"  # "</ans" was held back: it could still become the stop
    assert m.feed("anything") == "" and m.flush() == ""


def test_stop_holds_only_a_possible_prefix_and_releases_it_when_it_is_not() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("abcST") == "abc" and m.held == "ST"
    assert m.feed("x") == "STx" and m.held == ""
    assert m.feed("S") == "" and m.flush() == "S"  # ended without a stop: held text is text


def test_earliest_of_several_stops_wins() -> None:
    m = StopMatcher(["cd", "b"])
    assert m.feed("abcd") == "a"


def test_text_stream_never_splits_a_character() -> None:
    snow = "☃".encode()  # three bytes, each its own "token" here
    vocab = Vocabulary([b"a", snow[:1], snow[1:2], snow[2:], "é".encode(), b""])
    stream = TextStream(vocab)
    out = [stream.feed(t) for t in (0, 1, 2, 3, 4, 5)]
    assert out == ["a", "", "", "☃", "é", ""]
    stream = TextStream(vocab)
    assert stream.feed(1) == "" and stream.finish() == "\ufffd"  # cut mid-character: one U+FFFD


def test_text_stream_matches_a_stop_inside_multibyte_text() -> None:
    vocab = Vocabulary(["日本".encode(), "語".encode()[:2], "語".encode()[2:], "で".encode()])
    stream = TextStream(vocab, ["語で"])
    assert [stream.feed(t) for t in (0, 1, 2, 3)] == ["日本", "", "", ""]
    assert stream.stopped


def test_vocabulary_spells_special_tokens_only_when_asked() -> None:
    vocab = Vocabulary([b"hi", b""], special={1: b"<|im_end|>"})
    assert vocab.text([0, 1]) == "hi"
    assert vocab.text([0, 1], special=True) == "hi<|im_end|>"


# drafters ---------------------------------------------------------------------------------------
def test_prompt_lookup_copies_what_followed_the_newest_match() -> None:
    history = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 2, 3]
    assert prompt_lookup(history, 3, n_max=2) == [7, 8, 2]  # the newest earlier "2 3" is followed by 7 8
    assert prompt_lookup([5, 6, 7], 3) == []  # nothing repeats
    assert prompt_lookup([1, 2, 1], 4, n_max=3) == [2, 1]  # falls back to shorter n-grams


def test_sanitise_keeps_the_usable_prefix() -> None:
    assert sanitise(Proposal((1, 2, 3, 4)), k=2, n_vocab=10).tokens == (1, 2)
    assert sanitise(Proposal((1, 99, 3)), k=5, n_vocab=10).tokens == (1,)
    assert sanitise(Proposal((1, -1)), k=5, n_vocab=10).tokens == (1,)
    assert sanitise("nonsense", k=5, n_vocab=10) is None
    good = {"ids": [1, 2], "p": [0.5, 0.5]}
    assert sanitise(Proposal((1,), (good,)), 4, 10).probs == (good,)
    assert sanitise(Proposal((1,), ({"ids": [1], "p": [float("nan")]},)), 4, 10).probs is None
    assert sanitise(Proposal((1,), ({"ids": [55], "p": [1.0]},)), 4, 10).probs is None


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class _Flaky:
    name, kind = "flaky", "test"

    def __init__(self) -> None:
        self.mode = "fail"

    async def propose(self, request: DraftRequest) -> Proposal:
        if self.mode == "fail":
            raise DrafterError("down")
        if self.mode == "slow":
            await asyncio.sleep(5)
        return Proposal((1, 2, 3))

    async def close(self) -> None:
        return None


def test_guard_fails_soft_and_backs_off_exponentially() -> None:
    clock, inner = _Clock(), _Flaky()
    guard = GuardedDrafter(inner, n_vocab=lambda: 10, clock=clock)
    request = DraftRequest((1,), 3)

    async def scenario() -> None:
        assert await guard.propose(request, 1.0) is None  # failure 1: back off 0.5 s
        assert not guard.available() and guard.seconds_until_retry() == pytest.approx(0.5)
        assert await guard.propose(request, 1.0) is None  # not even called while backing off
        assert guard.health.calls == 1
        clock.t += 0.5
        assert await guard.propose(request, 1.0) is None  # failure 2: back off 1 s
        assert guard.seconds_until_retry() == pytest.approx(1.0)
        clock.t += 1.0
        inner.mode = "slow"
        assert await guard.propose(request, 0.05) is None  # too slow is a failure too
        assert guard.health.timeouts == 1 and guard.seconds_until_retry() == pytest.approx(2.0)
        clock.t += 2.0
        inner.mode = "ok"
        assert (await guard.propose(request, 1.0)) == Proposal((1, 2, 3))
        assert guard.health.failures_in_a_row == 0

    asyncio.run(scenario())


def test_llama_server_drafter_asks_greedy_or_for_its_sampling_distribution() -> None:
    d = LlamaServerDrafter("http://x")
    greedy = d.body(DraftRequest((1, 2), 4))
    assert greedy["temperature"] == 0 and greedy["top_k"] == 1 and greedy["cache_prompt"]
    assert greedy["prompt"] == [1, 2] and greedy["n_predict"] == 4
    sampled = d.body(DraftRequest((1,), 4, Sampling(temperature=0.7, top_p=0.9)))
    assert sampled["post_sampling_probs"] and sampled["n_probs"] == sampled["top_k"] == 32
    answer = {
        "tokens": [5, 6],
        "completion_probabilities": [
            {"id": 5, "prob": 0.6, "top_probs": [{"id": 5, "prob": 0.6}, {"id": 7, "prob": 0.4}]},
            {"id": 6, "prob": 0.1, "top_probs": [{"id": 8, "prob": 0.9}]},
        ],
    }
    p = parse_completion(answer, sampled=True)
    assert p.tokens == (5, 6)
    assert p.probs == ({"ids": [5, 7], "p": [0.6, 0.4]}, {"ids": [8, 6], "p": [0.9, 0.1]})
    assert parse_completion(answer, sampled=False).probs is None
    with pytest.raises(DrafterError):
        parse_completion({"content": "no tokens"}, sampled=False)


# requests ---------------------------------------------------------------------------------------
def test_what_speculation_cannot_serve_passes_through() -> None:
    assert passthrough_reason({"prompt": "x"}) is None
    assert passthrough_reason({"prompt": "x", "n": 1, "logprobs": None, "stop": ["a"]}) is None
    assert passthrough_reason({"messages": [], "tools": [{"type": "function"}]}) is None  # speculated
    assert passthrough_reason({"prompt": "x", "n": 2}) == "n > 1"
    # Speculated since the verify API carries them (the target's logprobs, penalties, bias):
    assert passthrough_reason({"prompt": "x", "logprobs": 3}) is None
    assert passthrough_reason({"messages": [], "logprobs": True, "top_logprobs": 2}) is None
    assert passthrough_reason({"prompt": "x", "presence_penalty": 0.5, "logit_bias": {"1": 5}}) is None
    assert passthrough_reason({"prompt": "x", "echo": True}) == "echo"  # the engine serves it
    assert passthrough_reason({"prompt": ["a", "b"]}) == "several prompts"


def test_params_parse_and_limits() -> None:
    p = parse_params({"temperature": 0, "stop": "\n", "max_tokens": 5, "stream": True}, None, 16)
    assert p.sampling.greedy and p.stops == ["\n"] and p.max_tokens == 5 and p.stream
    assert parse_params({}, None, 16).max_tokens == 16 and parse_params({}, None, None).max_tokens is None
    assert parse_params({}, 100, None).max_tokens == 100
    assert parse_params({"stream_options": {"include_usage": True}}, None, 1).include_usage
    with pytest.raises(InvalidRequest, match="at most 100"):
        parse_params({"max_tokens": 101}, 100, 16)
    for bad in ({"max_tokens": 0}, {"temperature": "hot"}, {"stop": 3}, {"top_p": 0}, {"stream": "yes"}):
        with pytest.raises(InvalidRequest):
            parse_params(bad, None, 16)
    assert parse_prompt({"prompt": ["hi"]}) == "hi" and parse_prompt({"prompt": [1, 2]}) == [1, 2]
    with pytest.raises(InvalidRequest):
        parse_prompt({"prompt": []})


# conversations ----------------------------------------------------------------------------------
def test_conversations_reuse_the_id_whose_history_shares_the_prompt() -> None:
    pool = ConversationPool(2, prefix="p")
    a = pool.acquire([1, 2, 3])
    pool.release(a, [1, 2, 3, 4, 5], 0.0)
    b = pool.acquire([9, 9])
    pool.release(b, [9, 9, 9], 0.0)
    follow_up = pool.acquire([1, 2, 3, 4, 5, 6, 7])  # the next turn of a's chat
    assert follow_up.conversation == a.conversation and follow_up.shared == 5
    other = pool.acquire([1, 2])  # a is busy: the other id
    assert other.conversation == b.conversation
    assert pool.acquire([1]) is None  # everything busy: it waits (tests/proxy/test_admission.py)


# config -----------------------------------------------------------------------------------------
def test_config_from_the_example_manifest() -> None:
    manifest = load_manifest(ROOT / "examples" / "local.yaml")
    config = from_manifest(manifest)
    assert config.target_url == "http://127.0.0.1:8080"
    assert config.port == 8088 and config.host == "127.0.0.1" and config.mode == "speculate"
    assert [(d.kind, d.url) for d in config.drafters] == [("llama-server", "http://127.0.0.1:8081")]
    assert config.max_draft_tokens is None and config.check() is config


def test_config_refuses_to_listen_beyond_loopback_without_a_token() -> None:
    with pytest.raises(TightwadError, match="without a token"):
        ProxyConfig("http://e", drafters=[], mode="passthrough", host="0.0.0.0").check()
    ProxyConfig("http://e", mode="passthrough", host="0.0.0.0", token="t").check()
    with pytest.raises(TightwadError, match="needs a drafter"):
        ProxyConfig("http://e").check()
