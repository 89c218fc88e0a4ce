"""What the proxy measures: Prometheus metrics (prometheus-client, one registry per app) and the
plain counters behind `GET /tightwad/v1/stats` and `tightwad proxy status`."""

from __future__ import annotations

import time
from collections import Counter as Tally
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from tightwad.proxy.kpolicy.estimates import Average

disable_created_metrics()  # no `*_created` series: they double the output and nobody graphs them

TOKEN_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.m_requests = Counter(
            "tightwad_proxy_requests",
            "Requests by route and how they were served",
            ["route", "served"],
            registry=r,
        )
        self.m_rounds = Counter("tightwad_proxy_rounds", "Verify rounds", registry=r)
        self.m_drafted = Counter(
            "tightwad_proxy_draft_tokens", "Draft tokens sent to verification", registry=r
        )
        self.m_accepted = Counter(
            "tightwad_proxy_accepted_tokens", "Draft tokens the target accepted", registry=r
        )
        self.m_generated = Counter(
            "tightwad_proxy_generated_tokens", "Target tokens produced, by how", ["source"], registry=r
        )
        self.m_acceptance = Gauge(
            "tightwad_proxy_acceptance_ratio", "Estimated per-token acceptance", registry=r
        )
        self.m_k = Gauge(
            "tightwad_proxy_draft_length", "Draft tokens per round chosen now (0 = off)", registry=r
        )
        self.m_per_round = Histogram(
            "tightwad_proxy_tokens_per_round",
            "Target tokens per verify round",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.m_ttft = Histogram(
            "tightwad_proxy_time_to_first_token_seconds",
            "Request start to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.m_inter = Histogram(
            "tightwad_proxy_inter_token_seconds",
            "Time between tokens (a round's gap spread over its tokens)",
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self.m_fallbacks = Counter(
            "tightwad_proxy_fallbacks", "Rounds served by the target alone, by reason", ["reason"], registry=r
        )
        self.m_errors = Counter(
            "tightwad_proxy_errors", "Requests that failed, by error code", ["code"], registry=r
        )
        # Admission (conversations.py): who holds a conversation, who waits, who was refused.
        self.m_busy = Gauge(
            "tightwad_proxy_conversations_busy", "Engine conversations held by running replies", registry=r
        )
        self.m_waiting = Gauge(
            "tightwad_proxy_waiting_requests", "Requests waiting for a conversation", registry=r
        )
        self.m_refused = Counter(
            "tightwad_proxy_refused",
            "Requests refused with 503 and Retry-After (queue_full, queue_timeout)",
            ["code"],
            registry=r,
        )
        self.m_evicted = Counter(
            "tightwad_proxy_conversation_evicted",
            "Verify calls the engine answered conversation_evicted (the reply resent its whole text)",
            registry=r,
        )
        self.m_queue_wait = Histogram(
            "tightwad_proxy_queue_wait_seconds",
            "How long requests that waited for a conversation waited",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # The same facts as plain numbers, for /tightwad/v1/stats.
        self.started = time.time()
        self.requests: Tally[str] = Tally()
        self.fallbacks: Tally[str] = Tally()
        self.errors: Tally[str] = Tally()
        self.rounds = self.drafted = self.accepted = 0
        self.generated: Tally[str] = Tally()
        self.decode_rate = Average(0.0, half_life=8)  # tokens/s of recent replies, after the first token
        self.ttft = Average(0.0, half_life=8)
        self.queue: dict[str, Any] = {}  # the pool's size, busy, waiting and bounds, as last reported
        self.refusals: Tally[str] = Tally()
        self.waited_requests = self.left_requests = self.evicted = 0
        self.queue_wait = Average(0.0, half_life=8)

    def request(self, route: str, served: str) -> None:
        self.m_requests.labels(route, served).inc()
        self.requests[served] += 1

    def round(self, drafted: int, accepted: int, produced: int) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.generated["verify"] += produced
        self.m_rounds.inc()
        self.m_drafted.inc(drafted)
        self.m_accepted.inc(accepted)
        self.m_generated.labels("verify").inc(produced)
        self.m_per_round.observe(produced)

    def engine_tokens(self, n: int) -> None:
        self.generated["engine"] += n
        self.m_generated.labels("engine").inc(n)

    def fallback(self, reason: str) -> None:
        self.fallbacks[reason] += 1
        self.m_fallbacks.labels(reason).inc()

    def error(self, code: str) -> None:
        self.errors[code] += 1
        self.m_errors.labels(code).inc()

    def admission(self, size: int, busy: int, waiting: int, limit: int, timeout: float) -> None:
        self.queue = {
            "conversations": size,
            "busy": busy,
            "waiting": waiting,
            "queue_limit": limit,
            "queue_timeout_s": timeout,
        }
        self.m_busy.set(busy)
        self.m_waiting.set(waiting)

    def refused(self, code: str) -> None:
        self.refusals[code] += 1
        self.m_refused.labels(code).inc()

    def waited(self, seconds: float) -> None:
        self.waited_requests += 1
        self.queue_wait.add(seconds)
        self.m_queue_wait.observe(seconds)

    def left_queue(self) -> None:
        self.left_requests += 1

    def conversation_evicted(self) -> None:
        self.evicted += 1
        self.m_evicted.inc()

    def policy(self, k: int, acceptance: float) -> None:
        self.m_k.set(k)
        self.m_acceptance.set(acceptance)

    def first_token(self, seconds: float) -> None:
        self.m_ttft.observe(seconds)
        self.ttft.add(seconds)

    def gap(self, seconds: float, tokens: int) -> None:
        for _ in range(max(tokens, 0)):
            self.m_inter.observe(seconds / max(tokens, 1))

    def reply(self, tokens_after_first: int, seconds_after_first: float) -> None:
        if tokens_after_first >= 4 and seconds_after_first > 0:
            self.decode_rate.add(tokens_after_first / seconds_after_first)

    def snapshot(self) -> dict[str, Any]:
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "requests": dict(self.requests),
            "rounds": self.rounds,
            "draft_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_measured": round(self.accepted / self.drafted, 4) if self.drafted else None,
            "tokens_per_round": round(self.generated["verify"] / self.rounds, 3) if self.rounds else None,
            "generated_tokens": dict(self.generated),
            "fallbacks": dict(self.fallbacks),
            "errors": dict(self.errors),
            "tok_s": round(self.decode_rate.value, 2) if self.decode_rate.measured else None,
            "ttft_ms": round(self.ttft.value * 1e3, 1) if self.ttft.measured else None,
            "admission": {
                **self.queue,
                "refused": dict(self.refusals),
                "waited": self.waited_requests,
                "left_while_waiting": self.left_requests,
                "wait_ms": round(self.queue_wait.value * 1e3, 1) if self.queue_wait.measured else None,
                "conversation_evicted": self.evicted,
            },
        }
