"""The verify API, version 1: the one contract between the engine (its server) and the proxy (its
client). Both sides encode and decode through this module, so the wire cannot drift between them.

    POST /tightwad/v1/verify
      {conversation, tokens, reset?, drafts: [{tokens, probs?}], sampling?}
      -> {object: "tightwad.verify", version, tokens, n_accepted, draft_index, accepted_per_draft,
          n_past, eog, pieces}
    GET  /tightwad/v1/stats       the engine's counters (decodes, requests per decode, acceptance)

A conversation is a KV sequence the engine keeps between calls. `tokens` are the conversation's
tokens since the last call (usually none: the engine already holds what it returned), or its whole
token list on the first call or with `reset: true` (the engine keeps the longest common prefix it
holds). Each draft continues the conversation; all of them are scored in ONE decode.

`probs` (optional) is the drafter's distribution, one row per draft token: either a dense list of
n_vocab floats or `{"ids": [...], "p": [...]}` (zero elsewhere); rows are normalised by the engine.
Without it a sampled draft is judged by the point-mass rule, which is exact for any drafter.

`sampling` is `{temperature, top_k, top_p, seed, presence_penalty?, frequency_penalty?, logit_bias?}`,
greedy when absent. Without `seed` the conversation has a random stream of fresh entropy; with one,
every random number is a pure function of (seed, the token's absolute position in the
conversation), so a reply does not depend on how rounds were cut (engine/verify.py, "Seeds").
Penalties count the tokens of the conversation from `generation_start` on (the generated text, as
OpenAI defines them), and at a draft position also the draft's earlier tokens; `logit_bias` is
`{"token id": bias}` with bias in [-100, 100], added to the logits before anything else.
A temperature below MIN_TEMPERATURE (1e-5) is greedy: dividing logits by less overflows, and the
distribution is a point mass to within float precision anyway. `seed` is any 64-bit integer,
signed or not (-2^63 .. 2^64-1); a negative one (llama.cpp clients send -1) is read as its
two's-complement unsigned value, so it is a reproducible stream like any other.

Sizes are checked before anything grows with them: a row of `probs` is kept as sent (sparse rows
stay sparse) and made dense, one row at a time, only when the engine's acceptance rule reads it.

`logprobs` (optional, 0..MAX_TOP_LOGPROBS) asks for each returned token's log-probability and that
many most likely alternatives: log-softmax of the target's logits after `logit_bias` and the
penalties, at temperature 1, before top-k/top-p (the reply's `logprobs`, one entry per token).

`grammar` (optional) constrains the generated text, from `generation_start` on: an OpenAI
constraint, `{"response_format": {...}}` (json_object, json_schema), `{"tools": [...],
"tool_choice": ..., "family": ...}` (a required call) or `{"gbnf": "..."}`. The target's
distribution at every draft position is masked by the grammar in the state the conversation's text
and the draft's earlier tokens put it in; a draft token it refuses is rejected like any other, and
an end of generation is allowed only where the grammar is complete. The engine keeps each
conversation's grammar state between calls, advanced over accepted tokens only. An engine that
predates `grammar` refuses it by name (unknown field), never ignores it.

The reply's `tokens` are the accepted draft tokens of draft `draft_index`, then the target's next
token (a correction, or the bonus after a fully accepted draft); `n_accepted` counts the accepted
draft tokens; `accepted_per_draft` is, for each draft, how many of its tokens the reply starts with.
`n_past` is how many of the conversation's tokens are now in the KV (all but the last returned
one); `eog` says the last token ends the generation; `pieces` are the reply tokens' bytes, base64.

A conversation the engine does not hold (evicted to make room, or the engine is new) answers 409
with code `conversation_evicted` unless the call has `reset: true`: the client then resends it whole.
Every other error is an OpenAI-shaped error (see tightwad.openai) with its status.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tightwad.openai import (
    InvalidRequest,
    OpenAIError,
    UpstreamError,
    from_upstream,
    get_field,
    token_list,
)

VERSION = 1
PREFIX = f"/tightwad/v{VERSION}"
VERIFY_PATH = f"{PREFIX}/verify"
STATS_PATH = f"{PREFIX}/stats"
REPLY_OBJECT = "tightwad.verify"

# A row of drafter probabilities as sent: dense (n_vocab floats) or sparse {"ids": [...], "p": [...]}.
ProbRow = list[float] | dict[str, Any]


# errors ----------------------------------------------------------------------------------------
class ConversationEvicted(OpenAIError):
    """The engine does not hold this conversation (evicted, or a new engine): resend it whole with
    `reset: true`. Raised by the engine, and by the proxy's client when the engine answers it."""

    status = 409
    type = "invalid_request_error"
    code = "conversation_evicted"


# The errors of this contract, by their wire code: a client raises the class, never compares text.
ERRORS: dict[str, type[OpenAIError]] = {ConversationEvicted.code: ConversationEvicted}


def decode_error(status: int, body: Any, fallback: str) -> OpenAIError:
    """An error the engine answered with: this contract's own class when its code is one of ours."""
    error = from_upstream(status, body, fallback)
    known = ERRORS.get(error.code)
    return known(str(error)) if known is not None else error


# sampling --------------------------------------------------------------------------------------
MIN_TEMPERATURE = 1e-5  # below it: greedy (see the module doc)
_SEED_MIN, _SEED_END = -(2**63), 2**64
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]
MAX_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
MAX_BIASED_TOKENS = 1024  # entries of one logit_bias: bounds the work a request can ask for
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


class _FieldError(ValueError):
    """A bad sampling value, with the field it is in (the 400's `param`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Sampling:
    """How the target's next-token distribution is shaped (see engine/verify.py for the exact
    rule). temperature 0 = greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # for a reproducible random stream; None = fresh entropy
    presence_penalty: float = 0.0  # subtracted once from each token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of each token already generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by id, no zeros

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            message = f"temperature must be a finite number >= 0, got {self.temperature}"
            raise _FieldError("temperature", message)
        if self.top_k < 0:
            raise _FieldError("top_k", f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise _FieldError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not _SEED_MIN <= self.seed < _SEED_END:
            raise _FieldError("seed", f"seed must be a 64-bit integer (-2^63 .. 2^64-1), got {self.seed}")
        for key in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, key)
            if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise _FieldError(key, f"{key} must be between -2 and 2, got {value}")
        if len(self.logit_bias) > MAX_BIASED_TOKENS:
            raise _FieldError("logit_bias", f"logit_bias may name at most {MAX_BIASED_TOKENS} tokens")
        for token, bias in self.logit_bias:
            if token < 0:
                raise _FieldError("logit_bias", f"logit_bias keys must be token ids >= 0, got {token}")
            if not (math.isfinite(bias) and -MAX_BIAS <= bias <= MAX_BIAS):
                raise _FieldError("logit_bias", f"logit_bias values must be between -100 and 100, got {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        """The logits are changed before the rule reads them (penalties or a bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def rng_seed(self) -> int | None:
        """The seed as numpy takes it (non-negative): a negative one is its two's complement."""
        return None if self.seed is None else self.seed % _SEED_END

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
        if self.seed is not None:
            body["seed"] = self.seed
        if self.presence_penalty:
            body["presence_penalty"] = self.presence_penalty
        if self.frequency_penalty:
            body["frequency_penalty"] = self.frequency_penalty
        if self.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in self.logit_bias}
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any], default_temperature: float = 0.0) -> Sampling:
        """From a verify call's `sampling`, or from an OpenAI request body (the same keys)."""
        try:
            return cls(
                temperature=get_field(body, "temperature", float, default_temperature),
                top_k=get_field(body, "top_k", int, 0),
                top_p=get_field(body, "top_p", float, 1.0),
                seed=get_field(body, "seed", int, None),
                **shaping_fields(body),
            )
        except _FieldError as exc:
            raise InvalidRequest(f"`{exc.field}`: {exc}", param=exc.field) from exc
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc


def shaping_fields(body: dict[str, Any]) -> dict[str, Any]:
    """`presence_penalty`, `frequency_penalty` and `logit_bias` of an OpenAI body (or of a verify
    call's `sampling`) as Sampling's keyword arguments; InvalidRequest names the field."""
    raw = get_field(body, "logit_bias", dict, {})
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise InvalidRequest(
                f"`logit_bias` keys must be token ids (integers as strings), got {key!r}", param="logit_bias"
            ) from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"`logit_bias[{key}]` must be a number", param="logit_bias")
        if value:
            bias[token] = float(value)
    return {
        "presence_penalty": get_field(body, "presence_penalty", float, 0.0),
        "frequency_penalty": get_field(body, "frequency_penalty", float, 0.0),
        "logit_bias": tuple(sorted(bias.items())),
    }


def sampling_error(exc: ValueError) -> InvalidRequest:
    """A Sampling that could not be built, as the 400 that names its field."""
    if isinstance(exc, _FieldError):
        return InvalidRequest(f"`{exc.field}`: {exc}", param=exc.field)
    return InvalidRequest(str(exc))


# the request -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Draft:
    """One candidate continuation: token ids, and the drafter's distribution per token when it has
    one (None for greedy, text or n-gram drafters)."""

    tokens: tuple[int, ...]
    probs: tuple[ProbRow, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"tokens": list(self.tokens)}
        if self.probs is not None:
            body["probs"] = list(self.probs)
        return body

    def prob_rows(self, n_vocab: int, where: str) -> ProbRows | None:
        """The rows, checked (InvalidRequest naming `where` when one cannot be a distribution over
        this vocabulary) in time and memory proportional to what was sent, never tokens x n_vocab."""
        if self.probs is None:
            return None
        n = len(self.tokens)
        if len(self.probs) != n:
            raise InvalidRequest(f"`{where}` must be a list of {n} rows, one per draft token")
        rows = [_check_row(row, n_vocab, f"{where}[{i}]") for i, row in enumerate(self.probs)]
        return ProbRows(n_vocab, rows)

    def dense_probs(self, n_vocab: int, where: str) -> np.ndarray | None:
        """The rows as one (len(tokens), n_vocab) array, each normalised (for small cases and tests;
        the engine reads `prob_rows` lazily)."""
        rows = self.prob_rows(n_vocab, where)
        if rows is None:
            return None
        return np.stack([rows[i] for i in range(len(rows))]) if len(rows) else np.zeros((0, n_vocab))


# A checked row: dense (n_vocab floats, normalised) or sparse (ids, normalised p).
_Row = np.ndarray | tuple[np.ndarray, np.ndarray]


def _numbers(values: list[Any], where: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidRequest(f"`{where}` must hold numbers") from None
    if array.ndim != 1:
        raise InvalidRequest(f"`{where}` must be a flat list of numbers")
    return array


def _check_row(row: Any, n_vocab: int, where: str) -> _Row:
    if isinstance(row, list):
        if len(row) != n_vocab:
            raise InvalidRequest(f"`{where}` has {len(row)} entries; a dense row needs {n_vocab}")
        p = _numbers(row, where)
        ids = None
    elif isinstance(row, dict) and isinstance(row.get("ids"), list) and isinstance(row.get("p"), list):
        raw_ids, raw_p = row["ids"], row["p"]
        # Checked before anything is read, so a huge row costs nothing but its own parsing.
        if len(raw_ids) != len(raw_p) or len(raw_ids) > n_vocab:
            raise InvalidRequest(
                f"`{where}` needs `ids` (at most {n_vocab} token ids) and `p` of the same length"
            )
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in raw_ids):
            raise InvalidRequest(f"`{where}.ids` must be token ids in [0, {n_vocab})")
        if len(set(raw_ids)) != len(raw_ids):
            raise InvalidRequest(f"`{where}.ids` must not repeat a token id")
        ids = np.asarray(raw_ids, dtype=np.int64)
        p = _numbers(raw_p, f"{where}.p")
    else:
        raise InvalidRequest(f"`{where}` must be a list of {n_vocab} floats or {{ids, p}}")
    if not np.isfinite(p).all():
        raise InvalidRequest(f"`{where}` must hold finite numbers")
    total = p.sum()
    if not (np.isfinite(total) and total > 0 and (p >= 0).all()):
        raise InvalidRequest(f"`{where}` must be non-negative with a positive sum")
    p = p / total
    return p if ids is None else (ids, p)


class ProbRows(Sequence[np.ndarray]):
    """A draft's checked drafter rows; row i is made dense (n_vocab float64, sums to 1) when read."""

    def __init__(self, n_vocab: int, rows: list[_Row]) -> None:
        self.n_vocab = n_vocab
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self._rows[i]
        if isinstance(row, np.ndarray):
            return row
        ids, p = row
        dense = np.zeros(self.n_vocab, dtype=np.float64)
        dense[ids] = p
        return dense


@dataclass(frozen=True)
class VerifyRequest:
    conversation: str
    tokens: list[int]  # new since the last call, or the whole conversation with `reset`
    drafts: list[Draft] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    reset: bool = False
    # Where the generated text starts in the conversation (absolute position): penalties count
    # the tokens from there on. 0: all of them.
    generation_start: int = 0
    logprobs: int | None = None  # None: no logprobs; n: each token's and its n best alternatives
    # A decoding constraint on the generated text (from `generation_start` on): see `grammar` above.
    grammar: dict[str, Any] | None = None


def encode_request(request: VerifyRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "conversation": request.conversation,
        "tokens": list(request.tokens),
        "reset": request.reset,
        "drafts": [d.to_json() for d in request.drafts],
        "sampling": request.sampling.to_json(),
    }
    if request.generation_start:
        body["generation_start"] = request.generation_start
    if request.logprobs is not None:
        body["logprobs"] = request.logprobs
    if request.grammar is not None:
        body["grammar"] = request.grammar
    return body


def decode_request(body: dict[str, Any]) -> VerifyRequest:
    """A verify call's body, checked for shape (the engine checks ids and lengths against its model);
    InvalidRequest names the field that is wrong."""
    drafts = []
    for i, raw in enumerate(get_field(body, "drafts", list, [])):
        if not isinstance(raw, dict):
            raise InvalidRequest(f"drafts[{i}] must be an object with `tokens`")
        tokens = token_list(raw.get("tokens", []), f"drafts[{i}].tokens")
        probs = raw.get("probs")
        if probs is not None and not isinstance(probs, list):
            raise InvalidRequest(f"`drafts[{i}].probs` must be a list of rows, one per draft token")
        drafts.append(Draft(tuple(tokens), tuple(probs) if probs is not None else None))
    return VerifyRequest(
        conversation=get_field(body, "conversation", str, ""),
        tokens=token_list(body.get("tokens", []), "tokens"),
        drafts=drafts,
        sampling=Sampling.from_json(get_field(body, "sampling", dict, {})),
        reset=get_field(body, "reset", bool, False),
        generation_start=_non_negative(get_field(body, "generation_start", int, 0), "generation_start"),
        logprobs=check_top_logprobs(get_field(body, "logprobs", int, None), "logprobs"),
        grammar=get_field(body, "grammar", dict, None),
    )


def _non_negative(value: int, where: str) -> int:
    if value < 0:
        raise InvalidRequest(f"`{where}` must be >= 0, got {value}", param=where)
    return value


def check_top_logprobs(value: int | None, where: str) -> int | None:
    """A count of alternatives per token, 0..MAX_TOP_LOGPROBS (None: no logprobs at all)."""
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"`{where}` must be between 0 and {MAX_TOP_LOGPROBS}, got {value}", param=where)
    return value


# the reply -------------------------------------------------------------------------------------
LOGPROB_FLOOR = -9999.0  # what an impossible token's logprob is sent as (JSON has no -inf), as OpenAI


@dataclass(frozen=True)
class TokenLogprob:
    """One emitted token's log-probability under the target, and its most likely alternatives
    (most likely first, lower id first on ties)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"token": self.token, "logprob": self.logprob, "top": [[t, lp] for t, lp in self.top]}

    @staticmethod
    def from_json(body: Any) -> TokenLogprob:
        top = tuple((int(t), float(lp)) for t, lp in body.get("top", []))
        return TokenLogprob(int(body["token"]), float(body["logprob"]), top)


@dataclass(frozen=True)
class VerifyReply:
    tokens: list[int]  # the accepted draft tokens, then the target's next token (correction or bonus)
    n_accepted: int
    draft_index: int = 0  # the draft whose tokens were accepted
    eog: bool = False  # the last token ends the generation
    accepted_per_draft: list[int] = field(default_factory=list)  # per draft: tokens the reply starts with
    n_past: int = 0  # the conversation's tokens now in the KV (all but the last returned token)
    pieces: list[bytes] = field(default_factory=list)  # the bytes of each returned token
    logprobs: list[TokenLogprob] | None = None  # one per returned token, when the call asked


def encode_reply(reply: VerifyReply) -> dict[str, Any]:
    body: dict[str, Any] = {
        "object": REPLY_OBJECT,
        "version": VERSION,
        "tokens": list(reply.tokens),
        "n_accepted": reply.n_accepted,
        "draft_index": reply.draft_index,
        "accepted_per_draft": list(reply.accepted_per_draft),
        "n_past": reply.n_past,
        "eog": reply.eog,
        "pieces": encode_pieces(reply.pieces),
    }
    if reply.logprobs is not None:
        body["logprobs"] = [entry.to_json() for entry in reply.logprobs]
    return body


def decode_reply(body: Any) -> VerifyReply:
    """The engine's answer; UpstreamError when it is not one of this version's."""
    try:
        return VerifyReply(
            tokens=[int(t) for t in body["tokens"]],
            n_accepted=int(body["n_accepted"]),
            draft_index=int(body.get("draft_index", 0)),
            eog=bool(body["eog"]),
            accepted_per_draft=[int(n) for n in body.get("accepted_per_draft", [])],
            n_past=int(body.get("n_past", 0)),
            pieces=decode_pieces(body.get("pieces", [])),
            logprobs=decode_logprobs(body.get("logprobs")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError(f"the engine's verify answer is not verify API v{VERSION}: {exc!r}") from exc


def decode_logprobs(body: Any) -> list[TokenLogprob] | None:
    return None if body is None else [TokenLogprob.from_json(entry) for entry in body]


def encode_pieces(pieces: Sequence[bytes]) -> list[str]:
    """Token bytes as the engine sends them (here and from /tokenize, /detokenize): base64, so a
    piece that is part of a UTF-8 character travels intact."""
    return [base64.b64encode(p).decode("ascii") for p in pieces]


def decode_pieces(pieces: Sequence[str]) -> list[bytes]:
    return [base64.b64decode(p) for p in pieces]
