"""How many conversations the engine keeps, how long its queue is, and when a refused client should
come back: pure rules, no libllama.

The KV cache is one pool of `n_ctx` cells shared by every conversation (`kv_unified`): a
conversation costs the cells it holds, not a fixed share. So the number of conversation sequences
follows from that pool: `n_ctx // conversation_cells`, where `conversation_cells` is the working
size one conversation is expected to need (its prompt and reply), capped by llama.cpp's sequence
limit, which the scratch sequences of multi-draft verification share (parallel * max_drafts <= 256).
The pool itself can be sized from memory (`kv_cells_for`): what the devices have free once the
weights are in (on a CPU host, what its memory cgroups still allow: `host_free_bytes`), halved,
divided by the bytes one cell costs in every layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: conversation and scratch sequences together
DEFAULT_CONVERSATION_CELLS = 1024  # a chat turn with room to answer
QUEUE_PER_SEQUENCE = 4  # `--queue auto`: this many waiting requests per conversation sequence
MIN_QUEUE = 16  # ... and at least this many: one request's choices (n, prompt lists) always fit
CELL_ALIGN = 256  # llama.cpp pads the KV cache to this anyway
KV_SHARE = 0.5  # of the memory left after the weights: the rest is compute buffers and headroom
MAX_RETRY_AFTER = 600  # seconds: past this a client should rather hear "try another server"
# Bytes per element of each KV cache type (q8_0: 34-byte blocks of 32 values).
KV_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}


def sequence_limit(max_drafts: int) -> int:
    """The most conversation sequences llama.cpp allows when each brings max_drafts - 1 scratch ones."""
    return max(1, MAX_SEQUENCES // max(1, max_drafts))


def conversations_for(n_ctx: int, conversation_cells: int, max_drafts: int) -> int:
    """`--parallel auto`: as many conversations as the pool holds at `conversation_cells` each, at
    least one, at most the sequence limit."""
    if n_ctx < 1 or conversation_cells < 1:
        raise ValueError("n_ctx and conversation_cells must be >= 1")
    return max(1, min(n_ctx // conversation_cells, sequence_limit(max_drafts)))


def queue_bound(parallel: int) -> int:
    """`--queue auto`: requests allowed to wait for a sequence before new ones get 503. At least
    MIN_QUEUE, so the 16 choices one request may ask for (each a generation) fit an idle engine."""
    return max(MIN_QUEUE, QUEUE_PER_SEQUENCE * parallel)


def kv_bytes_per_cell(
    n_layer: int, n_head_kv: int, key_length: int, value_length: int, kv_type: str
) -> float:
    """What one KV cell costs: a key and a value vector per layer."""
    if kv_type not in KV_BYTES:
        raise ValueError(f"unknown KV cache type {kv_type!r}; one of {', '.join(KV_BYTES)}")
    return n_layer * n_head_kv * (key_length + value_length) * KV_BYTES[kv_type]


def kv_cells_for(
    free_bytes: int, model_bytes: int, bytes_per_cell: float, n_ctx_train: int, max_drafts: int
) -> int:
    """`--ctx auto`: KV cells that fit in half the memory left once the weights are loaded, rounded
    down to 256, and never more than every allowed conversation at the model's trained context.
    ValueError (saying what to pass instead) when not even one aligned block fits."""
    if bytes_per_cell <= 0:
        raise ValueError("a KV cell must cost something")
    budget = (free_bytes - model_bytes) * KV_SHARE
    cells = int(budget // bytes_per_cell) if budget > 0 else 0
    cells = min(cells, max(1, n_ctx_train) * sequence_limit(max_drafts))
    cells -= cells % CELL_ALIGN
    if cells < CELL_ALIGN:
        raise ValueError(
            f"only {max(0, free_bytes - model_bytes) / 2**20:.0f} MiB are free beside the weights, "
            f"too little for a KV cache of {CELL_ALIGN} cells: pass --ctx N"
        )
    return cells


def host_free_bytes(mem_available: int, cgroup_limits: Sequence[tuple[int, int]] = ()) -> int:
    """RAM this process may still use: the host's MemAvailable, but in a memory cgroup (a container)
    no more than each enclosing group's (limit, usage) leaves. A container sees the host's meminfo
    whole, and a KV cache sized from that would get the engine killed at its first long chat."""
    return max(0, min([mem_available, *(limit - usage for limit, usage in cgroup_limits)]))


def cgroup_memory_files(proc_self_cgroup: str, root: str = "/sys/fs/cgroup") -> list[tuple[str, str]]:
    """From /proc/self/cgroup's text: the (limit file, usage file) of this process's memory cgroup
    and of each of its ancestors, innermost first; v1's memory controller, else v2's."""
    v1 = v2 = None
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            v1 = parts[2]
        elif parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
    if v1 is not None:
        path, base, limit, usage = v1, f"{root}/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
    elif v2 is not None:
        path, base, limit, usage = v2, root, "memory.max", "memory.current"
    else:
        return []
    names = [name for name in path.split("/") if name]
    dirs = ["/".join([base, *names[:n]]) for n in range(len(names), -1, -1)]
    return [(f"{d}/{limit}", f"{d}/{usage}") for d in dirs]


def retry_after(ahead: int, parallel: int, recent_service: Sequence[float], fallback: float) -> int:
    """Seconds a refused client should wait: the requests ahead of it (and itself) served
    `parallel` at a time, each taking the mean of the engine's recent service times, i.e. the
    recent finish rate at full load; `fallback` while nothing has finished yet. At least 1."""
    if recent_service:
        mean = sum(recent_service) / len(recent_service)
        estimate = mean * math.ceil((max(0, ahead) + 1) / max(1, parallel))
    else:
        estimate = fallback
    return int(min(MAX_RETRY_AFTER, max(1, math.ceil(estimate))))
