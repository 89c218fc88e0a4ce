"""The live dashboard: `GET /dashboard` (a page with no data in it) and `GET /tightwad/v1/events`
(SSE: the proxy's stats once a second, plus pool health every few seconds).

No unauthenticated backdoor: the page holds no numbers; it asks for the proxy's token and reads the
event stream with `fetch` and an `Authorization: Bearer` header (EventSource cannot send headers,
and a token in the URL would end up in logs), so the events route is guarded like every other.
The page is embedded here (one module, nothing to package besides it).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

EVENT_EVERY = 1.0  # seconds between stats events
HEALTH_EVERY = 5.0  # seconds between pool health checks


async def live_stats(
    stats: Callable[[], dict[str, Any]],
    health: Callable[[], Awaitable[dict[str, Any]]],
    every: float = EVENT_EVERY,
    health_every: float = HEALTH_EVERY,
) -> AsyncIterator[str]:
    """JSON events: `stats()` with `pool` (the last health check) added, forever."""
    pool: dict[str, Any] = {}
    checked = 0.0
    while True:
        now = time.monotonic()
        if not pool or now - checked >= health_every:
            pool = await health()
            checked = now
        yield json.dumps({**stats(), "pool": pool, "at": round(time.time(), 3)})
        await asyncio.sleep(every)


DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Tightwad proxy</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #111; color: #eee; }
  h1 { font-size: 1.3rem; } h2 { font-size: 1rem; margin-top: 1.5rem; color: #9cf; }
  .cards { display: flex; flex-wrap: wrap; gap: .8rem; }
  .card { background: #222; border-radius: 6px; padding: .6rem 1rem; min-width: 9rem; }
  .card .v { font-size: 1.5rem; font-variant-numeric: tabular-nums; }
  .card .l { font-size: .75rem; color: #aaa; }
  table { border-collapse: collapse; } td, th { padding: .2rem .7rem; border-bottom: 1px solid #333; }
  .approx { color: #fc6; font-weight: bold; } .err { color: #f66; } .ok { color: #6f6; }
  #login { background: #222; padding: 1rem; border-radius: 6px; max-width: 28rem; }
</style>
</head>
<body>
<h1>Tightwad proxy <span id="mode"></span> <span id="approx" class="approx"></span></h1>
<form id="login">
  <label>Token <input id="token" type="password" autocomplete="current-password"></label>
  <button id="connect" type="submit">Connect</button>
  <div class="l">Leave empty when the proxy needs no token.</div>
</form>
<div id="status">not connected</div>
<div id="live" hidden>
  <div class="cards">
    <div class="card"><div class="v" id="requests">-</div><div class="l">requests</div></div>
    <div class="card"><div class="v" id="rounds">-</div><div class="l">verify rounds</div></div>
    <div class="card"><div class="v" id="acceptance">-</div><div class="l">acceptance</div></div>
    <div class="card"><div class="v" id="k">-</div><div class="l">K now</div></div>
    <div class="card"><div class="v" id="toks">-</div><div class="l">tok/s (recent replies)</div></div>
    <div class="card"><div class="v" id="speedup">-</div><div class="l">speedup vs target alone</div></div>
    <div class="card"><div class="v" id="generated">-</div><div class="l">tokens generated</div></div>
  </div>
  <h2>Admission (speculated requests)</h2>
  <div class="cards">
    <div class="card"><div class="v" id="busy">-</div><div class="l">conversations busy / size</div></div>
    <div class="card"><div class="v" id="waiting">-</div><div class="l">requests waiting</div></div>
    <div class="card"><div class="v" id="bound">-</div><div class="l">queue bound / timeout</div></div>
    <div class="card"><div class="v" id="refused">-</div><div class="l">503 queue full / timed out</div></div>
    <div class="card"><div class="v" id="wait">-</div><div class="l">queue wait (recent mean)</div></div>
  </div>
  <h2>Drafter wins (race)</h2><table id="wins"><tbody></tbody></table>
  <h2>Gate pass rates</h2><table id="gate"><tbody></tbody></table>
  <h2>Pool health</h2><div id="pool">-</div>
  <h2>Recent requests</h2><table id="recent"><tbody></tbody></table>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (v, d = 2) => v === null || v === undefined ? "-" : (typeof v === "number" ? +v.toFixed(d) : v);
function rows(id, head, data) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren();
  const tr = (cells, tag) => {
    const row = document.createElement("tr");
    for (const c of cells) { const el = document.createElement(tag); el.textContent = c; row.append(el); }
    body.append(row);
  };
  tr(head, "th");
  for (const r of data) tr(r, "td");
}
function show(s) {
  $("mode").textContent = "— " + s.mode + (s.model ? " — " + s.model : "");
  $("approx").textContent = s.consensus ? "APPROXIMATE (consensus, " + s.consensus.policy + ")" : "";
  const requests = Object.values(s.requests || {}).reduce((a, b) => a + b, 0);
  $("requests").textContent = requests;
  $("rounds").textContent = s.rounds;
  $("acceptance").textContent = fmt(s.acceptance_measured);
  $("k").textContent = s.policy ? (s.policy.speculating === false ? "off" : fmt(s.policy.k, 0)) : "-";
  $("toks").textContent = fmt(s.tok_s, 1);
  $("speedup").textContent = s.speedup_measured ? fmt(s.speedup_measured) + "x" : "-";
  $("generated").textContent = Object.values(s.generated_tokens || {}).reduce((a, b) => a + b, 0);
  // Admission is sized once the proxy has learnt the engine (speculate mode); until then "-".
  const adm = s.admission || {};
  const sized = adm.conversations !== undefined;
  const refused = adm.refused || {};
  $("busy").textContent = sized ? adm.busy + " / " + adm.conversations : "-";
  $("waiting").textContent = sized ? adm.waiting : "-";
  $("bound").textContent = sized ? adm.queue_limit + " / " + fmt(adm.queue_timeout_s, 1) + " s" : "-";
  $("refused").textContent = (refused.queue_full || 0) + " / " + (refused.queue_timeout || 0);
  $("wait").textContent = typeof adm.wait_ms === "number" ? fmt(adm.wait_ms, 0) + " ms" : "-";
  const race = s.race ? Object.entries(s.race.drafters) : [];
  rows("wins", ["drafter", "offered", "wins", "win rate", "cut off"],
       race.map(([n, l]) => [n, l.offered, l.wins, fmt(l.win_rate), l.cut]));
  const gate = s.gate ? Object.entries(s.gate.agents) : [];
  rows("gate", ["agent", "approve", "correct", "reject", "pass rate"],
       gate.map(([n, a]) => [n, a.approve, a.correct, a.reject, fmt(a.pass_rate)]));
  const pool = s.pool || {};
  $("pool").className = pool.ok ? "ok" : "err";
  $("pool").textContent = pool.ok ? "engine ok, " + (pool.workers || []).length + " rpc worker(s)"
                                  : "engine unreachable: " + (pool.error || "?");
  rows("recent", ["time", "route", "served", "prompt", "max_tokens"],
       (s.recent_requests || []).map((r) => [new Date(r.at * 1000).toLocaleTimeString(), r.route, r.served,
                                             r.prompt, fmt(r.max_tokens, 0)]));
}
function fail(why) { $("status").textContent = why; $("status").className = "err"; }
async function connect(token) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  $("status").textContent = "connecting";
  const response = await fetch("/tightwad/v1/events", { headers });
  if (response.status === 401) { fail("wrong or missing token"); return; }
  if (!response.ok) { fail("HTTP " + response.status); return; }
  $("login").hidden = true; $("live").hidden = false;
  $("status").textContent = "live"; $("status").className = "ok";
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.search(/\\r?\\n\\r?\\n/)) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\\r?\\n\\r?\\n/, "");
      const data = event.split(/\\r?\\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trim()).join("");
      if (data) show(JSON.parse(data));
    }
  }
  fail("disconnected");
}
$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  connect($("token").value).catch((err) => fail(String(err)));
});
</script>
</body>
</html>
"""
