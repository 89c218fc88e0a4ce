"""How many tokens to draft per round (K), and when not to speculate at all.

Three layers, each pure (no I/O, no clocks), read in this order:

- `costmodel.py`: the formula. Given what a round costs and how often draft tokens are accepted,
  the expected tokens per second at each K, and the best K (or 0: the target alone wins).
- `estimates.py`: decaying online estimates of those costs from measured rounds.
- `controller.py`: `KController`, fed by the speculation loop after every round, draft call and
  stretch of target-alone decoding; it answers `next_k()` under a `KPolicy` (limits, warm-up,
  when to switch speculation off and how often to probe again).

Kept apart because the formula is tested against the paper and the estimators against synthetic
timings, without the controller's state machine in the way.
"""
