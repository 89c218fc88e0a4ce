"""`tightwad benchmark`: the numbers it prints (pure), and one run against real processes.

The integration test starts the tiny appliance pieces (the engine on the F32 SmolLM2 target, a
llama-server drafter with its Q4_1 build, the proxy) and runs the real command line against them,
the way a user would: it must report identical greedy outputs and sane figures, in a few seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.engines import EngineProcess
from support.procs import Processes
from support.proxies import TOKEN, start_drafter, start_proxy

from tightwad import benchmark
from tightwad.benchmark import BenchmarkError, PromptResult, Reply
from tightwad.manifest import manifest_from_dict
from tightwad.toolchain import Toolchain

ROOT = Path(__file__).resolve().parents[2]


def reply(tokens: int, seconds: float, ids: tuple[int, ...] | None = (1, 2, 3), text: str = "x") -> Reply:
    return Reply(text=text, tokens=ids, completion_tokens=tokens, wall_s=seconds, ttft_s=0.05)


def result(alone_s: float, spec_s: float, same: bool = True, **kw) -> PromptResult:  # type: ignore[no-untyped-def]
    other = (1, 2, 3) if same else (1, 2, 4)
    return PromptResult("p", reply(64, alone_s), reply(64, spec_s, other), **kw)


def test_summary_is_aggregate_tokens_over_aggregate_time() -> None:
    # 128 tokens in 8 s alone (16 tok/s); 128 in 4 s speculating (32 tok/s): 2.0x, not the mean of ratios.
    results = [result(2.0, 1.0, drafted=10, accepted=8), result(6.0, 3.0, drafted=10, accepted=2)]
    s = benchmark.summarize(results)
    assert (s.tok_s, s.was_tok_s, s.speedup) == (32.0, 16.0, 2.0)
    assert s.acceptance == 0.5
    assert s.differing == ()
    assert benchmark.summary_line(s) == "2.0x | 32.0 tok/s (was 16.0) | greedy: output = target alone"


def test_summary_line_names_the_prompts_that_differed() -> None:
    s = benchmark.summarize([result(2.0, 1.0), result(2.0, 4.0, same=False), result(2.0, 2.0, same=False)])
    assert s.differing == (2, 3)
    assert (s.min_speedup, s.max_speedup) == (0.5, 2.0)
    assert benchmark.summary_line(s).endswith("output DIFFERS from target alone on prompt 2, 3 of 3")


def test_outputs_compare_by_ids_when_both_sides_have_them_else_by_text() -> None:
    same_text_other_ids = PromptResult("p", reply(3, 1, (1, 2)), reply(3, 1, (1, 3)))
    assert not same_text_other_ids.identical
    text_only = PromptResult("p", reply(3, 1, None, "abc"), reply(3, 1, (1, 2), "abc"))
    assert text_only.identical
    assert not PromptResult("p", reply(3, 1, None, "abc"), reply(3, 1, None, "abd")).identical
    # Several runs that disagreed among themselves never count as identical.
    assert not PromptResult("p", reply(3, 1), reply(3, 1), runs_agree=False).identical


def test_table_rows_and_json() -> None:
    results = [result(4.0, 2.0, drafted=20, accepted=15, fallbacks={"drafter_slow": 1})]
    [row] = benchmark.table_rows(results)
    assert row == ("1", "p", "64", "16.0", "32.0", "2.00x", "50/50", "75%", "yes")
    assert len(row) == len(benchmark.TABLE_COLUMNS)
    body = benchmark.to_json(results, benchmark.summarize(results), {"max_tokens": 64})
    assert body["max_tokens"] == 64
    assert body["summary"]["identical"] is True
    assert body["summary"]["fallbacks"] == {"drafter_slow": 1}
    assert body["prompts"][0]["target_alone"]["tok_s"] == 16.0
    assert body["prompts"][0]["acceptance"] == 0.75
    json.dumps(body)  # plain JSON all the way down


def test_no_results_is_a_clear_error() -> None:
    with pytest.raises(BenchmarkError, match="no prompts"):
        benchmark.summarize([])


def test_prompt_files(tmp_path: Path) -> None:
    lines = tmp_path / "p.txt"
    lines.write_text("# my prompts\nfirst one\n\n  second one  \n")
    assert benchmark.load_prompts(lines) == ["first one", "second one"]
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(["a\nmulti-line prompt", "b"]))
    assert benchmark.load_prompts(listed) == ["a\nmulti-line prompt", "b"]
    listed.write_text('{"prompt": "a"}')
    with pytest.raises(BenchmarkError, match="JSON list of non-empty strings"):
        benchmark.load_prompts(listed)
    lines.write_text("# only a comment\n")
    with pytest.raises(BenchmarkError, match="holds no prompts"):
        benchmark.load_prompts(lines)
    with pytest.raises(BenchmarkError, match="does not exist"):
        benchmark.load_prompts(tmp_path / "missing.txt")


def test_endpoints_from_a_manifest() -> None:
    import yaml

    data = yaml.safe_load((ROOT / "examples" / "local.yaml").read_text())
    data["spec"]["hosts"][0]["modelDir"] = "~/models"  # as `tightwad` would interpolate it
    endpoints = benchmark.endpoints_from_manifest(manifest_from_dict(data))
    assert (endpoints.proxy, endpoints.target, endpoints.token) == (
        "http://127.0.0.1:8088",
        "http://127.0.0.1:8080",
        None,
    )
    data["spec"]["proxy"]["bind"] = "0.0.0.0"
    data["spec"]["hosts"][0]["address"] = "10.1.2.3"
    data["spec"]["auth"] = {"token": "s3cret"}
    endpoints = benchmark.endpoints_from_manifest(manifest_from_dict(data))
    assert (endpoints.proxy, endpoints.target, endpoints.token) == (
        "http://10.1.2.3:8088",
        "http://10.1.2.3:8080",
        "s3cret",
    )
    del data["spec"]["proxy"], data["spec"]["drafters"]
    with pytest.raises(BenchmarkError, match=r"spec\.proxy is missing"):
        benchmark.endpoints_from_manifest(manifest_from_dict(data))


def test_the_command_says_which_cluster_to_measure() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tightwad.cli", "benchmark", "--tokens", "8"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "--proxy URL --target URL" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.integration
def test_benchmark_against_the_real_pieces(
    toolchain: Toolchain, local_engine: EngineProcess, processes: Processes, tmp_path: Path
) -> None:
    drafter, _ = start_drafter(processes, toolchain)
    proxy = start_proxy(processes, local_engine.url, draft=drafter)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Write a Python function that adds two numbers.\nSay hello.\n")
    cmd = [
        sys.executable,
        "-m",
        "tightwad.cli",
        "benchmark",
        "--proxy",
        proxy.url,
        "--target",
        local_engine.url,
    ]
    cmd += ["--token", TOKEN, "--prompts", str(prompts), "--tokens", "24", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    summary = body["summary"]
    assert summary["identical"] is True, body
    assert summary["line"].endswith("greedy: output = target alone")
    assert [p["prompt"] for p in body["prompts"]] == [
        "Write a Python function that adds two numbers.",
        "Say hello.",
    ]
    for entry in body["prompts"]:
        assert 0 < entry["speculated"]["completion_tokens"] <= 24
        assert entry["speculated"]["completion_tokens"] == entry["target_alone"]["completion_tokens"]
        assert entry["target_alone"]["tok_s"] > 0 and entry["speculated"]["tok_s"] > 0
    # The proxy really speculated (a same-model pair accepts most drafts) and counted it per prompt.
    assert sum(p["drafted"] for p in body["prompts"]) > 0
    assert summary["acceptance"] is not None and summary["acceptance"] > 0.3
    assert "benchmark: 2 prompts" in done.stderr
