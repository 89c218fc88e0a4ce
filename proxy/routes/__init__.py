"""The proxy's HTTP routes, one module per job; app.py puts them in one Starlette app.

  health.py        GET /health, /ready (open, ok or an error code); /tightwad/v1/health (details, token)
  info.py          GET /v1/models, /tightwad/v1/stats, /tightwad/v1/events, /dashboard, /metrics
  generate.py      POST /v1/completions, /v1/chat/completions: speculative, or passed through
  passthrough.py   a request sent to the engine unchanged (what speculation cannot serve)
  shaping.py       OpenAI reply bodies and stream chunks from a generated reply's text
  gate_chat.py     POST /tightwad/v1/gate/chat/completions (the quality gate, ../gate.py)

Every route object holds the shared `Proxy` (../state.py) and reads its parts at call time.
"""
