"""The pinned toolchain end to end: two real rpc workers on loopback, a real model loaded through
them by libllama (llama-cpp-python's low-level API), and the same greedy continuation that
llama-server gives for the same model and prompt."""

from __future__ import annotations

import pytest
from support.engines import llama_server_greedy
from support.procs import Processes, start_rpc_workers

from tightwad import models
from tightwad.engine import libllama
from tightwad.launch import free_port, llama_server_command, wait_for_http
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

PROMPT = "<|im_start|>user\nList three uses of a paperclip.<|im_end|>\n<|im_start|>assistant\n"
N_TOKENS = 40


def test_model_through_two_rpc_workers_matches_llama_server(
    toolchain: Toolchain, processes: Processes
) -> None:
    model_path = models.resolve("smollm2-135m-q4_1")
    endpoints = start_rpc_workers(processes, toolchain, 2)

    devices = libllama.rpc_devices(endpoints)
    assert [d.endpoint for d in devices] == endpoints
    assert all(d.total_bytes > 0 for d in devices)

    model = libllama.Model(model_path, devices)
    ctx = libllama.Context(model, n_ctx=512)
    try:
        prompt = model.tokenize(PROMPT)
        ours = libllama.greedy_generate(ctx, prompt, N_TOKENS)
    finally:
        ctx.close()
        model.close()

    port = free_port()
    server, log = processes.start(
        "llama-server", llama_server_command(toolchain, model_path, port, ctx_size=512, threads=1)
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", process=server, log=log)
    theirs = llama_server_greedy(url, prompt, len(ours))

    assert len(ours) >= 10, "the model should say something"
    assert ours == theirs


def test_unreachable_worker_is_a_clear_error(toolchain: Toolchain) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(libllama.LlamaError, match=f"rpc worker {dead} is unreachable"):
        libllama.rpc_devices([dead])
