"""The engine's capacity rules (engine/capacity.py): conversations from the KV cache, the KV cache
from memory, the queue's bound, and the Retry-After estimate."""

from __future__ import annotations

import itertools

import pytest

from tightwad.engine import capacity


def test_conversations_follow_the_kv_cells() -> None:
    assert capacity.conversations_for(4096, 1024, max_drafts=4) == 4  # the old fixed default
    assert capacity.conversations_for(32768, 1024, max_drafts=4) == 32
    assert capacity.conversations_for(2048, 256, max_drafts=1) == 8


def test_at_least_one_conversation_even_in_a_small_cache() -> None:
    assert capacity.conversations_for(512, 1024, max_drafts=4) == 1


def test_llama_cpp_sequence_limit_is_shared_with_the_scratch_sequences() -> None:
    # 1M cells would be 1024 conversations; 256 sequences / 4 drafts each leaves 64.
    assert capacity.conversations_for(1 << 20, 1024, max_drafts=4) == 64
    assert capacity.conversations_for(1 << 20, 1024, max_drafts=1) == 256
    for drafts in (1, 2, 3, 4, 7, 16):
        assert capacity.conversations_for(1 << 22, 64, drafts) * drafts <= capacity.MAX_SEQUENCES


def test_nonsense_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        capacity.conversations_for(0, 1024, 4)
    with pytest.raises(ValueError):
        capacity.conversations_for(4096, 0, 4)


def test_the_queue_is_a_few_requests_per_sequence() -> None:
    assert capacity.queue_bound(8) == 32 and capacity.queue_bound(64) == 256
    # Never below 16: one request may ask for 16 choices, each a generation of its own.
    assert capacity.queue_bound(1) == 16


def test_kv_cell_bytes() -> None:
    # SmolLM2-135M: 30 layers, 3 KV heads of 64: 30 * 3 * 128 values of 2 bytes (f16).
    assert capacity.kv_bytes_per_cell(30, 3, 64, 64, "f16") == 23040
    assert capacity.kv_bytes_per_cell(30, 3, 64, 64, "f32") == 46080
    with pytest.raises(ValueError, match="q4_0"):
        capacity.kv_bytes_per_cell(30, 3, 64, 64, "q4_0")


def test_kv_cells_from_memory() -> None:
    gib = 1 << 30
    # 8 GiB free, a 1 GiB model: half of 7 GiB at 64 KiB a cell = 57344 cells (a multiple of 256).
    assert capacity.kv_cells_for(8 * gib, gib, 65536, n_ctx_train=32768, max_drafts=4) == 57344
    # Never more than every allowed conversation at the trained context: 64 * 512.
    assert capacity.kv_cells_for(8 * gib, gib, 1024, n_ctx_train=512, max_drafts=4) == 64 * 512
    # Rounded down to llama.cpp's 256-cell padding.
    assert capacity.kv_cells_for(gib + 2 * 1000 * 300, gib, 1000, 32768, 4) == 256


def test_too_little_memory_says_what_to_pass() -> None:
    with pytest.raises(ValueError, match="pass --ctx N"):
        capacity.kv_cells_for(1 << 30, 1 << 30, 65536, 32768, 4)


def test_retry_after_follows_the_recent_finish_rate() -> None:
    # 2 s per request, 4 at a time: the 1st..4th in line are served within one round, the 5th in two.
    assert capacity.retry_after(0, 4, [2.0, 2.0], fallback=99) == 2
    assert capacity.retry_after(3, 4, [2.0, 2.0], fallback=99) == 2
    assert capacity.retry_after(4, 4, [1.0, 3.0], fallback=99) == 4
    # Nothing finished yet: the fallback (how long the oldest running request has taken so far).
    assert capacity.retry_after(0, 1, [], fallback=7.2) == 8


def test_retry_after_is_at_least_a_second_and_bounded() -> None:
    assert capacity.retry_after(0, 8, [0.01], fallback=0) == 1
    assert capacity.retry_after(10_000, 1, [60.0], fallback=0) == capacity.MAX_RETRY_AFTER


def test_a_manifest_with_max_conversations_auto_lets_the_engine_size_itself() -> None:
    from support.plans import desired, manifest_data

    from tightwad.operator.commands import Binaries, command

    data = manifest_data()
    data["spec"]["target"]["maxConversations"] = "auto"
    engine = desired(data).engine
    argv = command(engine, Binaries(python=("python", "-m")), {"big": "/m/big.gguf"})
    flags = dict(itertools.pairwise(argv))
    # The KV cache from memory, as many conversations as it holds at the model's context each.
    assert (
        flags["--ctx"] == "auto" and flags["--parallel"] == "auto" and flags["--conversation-ctx"] == "1024"
    )
    # A number stays what it was: a whole context per conversation, nothing else on the line.
    fixed = command(desired().engine, Binaries(python=("python", "-m")), {"big": "/m/big.gguf"})
    assert "--conversation-ctx" not in fixed
    assert fixed[fixed.index("--ctx") + 1] == "2048" and fixed[fixed.index("--parallel") + 1] == "2"


def test_max_conversations_takes_auto_or_a_count_and_names_the_field_otherwise() -> None:
    from support.plans import manifest_data

    from tightwad.errors import TightwadError
    from tightwad.manifest import manifest_from_dict

    data = manifest_data()
    data["spec"]["target"]["maxConversations"] = "auto"
    assert manifest_from_dict(data).spec.target.max_conversations == "auto"
    data["spec"]["target"]["maxConversations"] = "many"
    with pytest.raises(TightwadError, match="maxConversations"):
        manifest_from_dict(data)


def test_a_containers_memory_limit_bounds_what_is_free() -> None:
    gib = 1 << 30
    # No cgroup limit: the host's MemAvailable.
    assert capacity.host_free_bytes(20 * gib) == 20 * gib
    # A 4 GiB container already using 1 GiB has 3 GiB left, whatever the host has free.
    assert capacity.host_free_bytes(20 * gib, [(4 * gib, 1 * gib)]) == 3 * gib
    # The tightest of nested groups counts; a generous limit on a busy host leaves the host's bound.
    assert capacity.host_free_bytes(20 * gib, [(64 * gib, gib), (6 * gib, 4 * gib)]) == 2 * gib
    assert capacity.host_free_bytes(2 * gib, [(64 * gib, gib)]) == 2 * gib
    # Over its limit already: nothing, which --ctx auto turns into "pass --ctx N".
    assert capacity.host_free_bytes(20 * gib, [(gib, 2 * gib)]) == 0


def test_the_cgroup_files_are_found_from_proc_self_cgroup() -> None:
    v1 = "4:memory:/docker/abc\n3:cpuset:/\n0::/"
    assert capacity.cgroup_memory_files(v1, root="/cg") == [
        ("/cg/memory/docker/abc/memory.limit_in_bytes", "/cg/memory/docker/abc/memory.usage_in_bytes"),
        ("/cg/memory/docker/memory.limit_in_bytes", "/cg/memory/docker/memory.usage_in_bytes"),
        ("/cg/memory/memory.limit_in_bytes", "/cg/memory/memory.usage_in_bytes"),
    ]
    # v2 (one unified hierarchy); a container's own namespace shows its group as "/".
    assert capacity.cgroup_memory_files("0::/", root="/cg") == [("/cg/memory.max", "/cg/memory.current")]
    assert [limit for limit, _ in capacity.cgroup_memory_files("0::/a/b", root="/cg")] == [
        "/cg/a/b/memory.max",
        "/cg/a/memory.max",
        "/cg/memory.max",
    ]
    assert capacity.cgroup_memory_files("", root="/cg") == []
