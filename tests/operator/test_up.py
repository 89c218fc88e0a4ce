"""`tightwad up examples/local.yaml` (what `make up` runs) serves a real chat completion."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from support import ROOT
from support.procs import default_signals

from tightwad.ports import free_port_below_ephemeral

pytestmark = pytest.mark.integration


def test_up_serves_the_local_example_and_stops_cleanly(tmp_path: Path) -> None:
    # The example as shipped, on free ports so a running appliance does not collide with the test.
    manifest = yaml.safe_load((ROOT / "examples" / "local.yaml").read_text())
    for gpu in manifest["spec"]["hosts"][0]["gpus"]:
        gpu["port"] = free_port_below_ephemeral()
    manifest["spec"]["target"]["port"] = free_port_below_ephemeral()
    manifest["spec"]["drafters"][0]["port"] = free_port_below_ephemeral()
    manifest["spec"]["proxy"]["port"] = proxy_port = free_port_below_ephemeral()
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(manifest))
    env = {**os.environ, "TIGHTWAD_STATE_DIR": str(tmp_path / "state")}  # not the user's own cluster

    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "tightwad.cli", "up", str(path)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
            preexec_fn=default_signals,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "Tightwad is up" not in log.read_text():
            assert up.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        text = log.read_text()
        url = re.search(r"Tightwad is up: (\S+)/v1", text).group(1)  # type: ignore[union-attr]
        assert url == f"http://127.0.0.1:{proxy_port}"
        assert f"curl -s {url}/v1/chat/completions" in text

        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["smollm2-135m-f32"]
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 16,
                "temperature": 0,
            },
            timeout=120,
        ).json()
        assert reply["choices"][0]["message"]["content"].strip()
        assert reply["usage"]["completion_tokens"] > 0
    finally:  # stopped only once it is up, by a signal it always handles (as Ctrl-C)
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(timeout=30)
    assert up.returncode == 0, log.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)
    assert not list((tmp_path / "state" / "local" / "units").glob("*.json"))  # every unit stopped
    status = json.loads((tmp_path / "local.status.json").read_text())  # status beside the manifest
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
        ("Ready", "False", "Stopped"), ("Progressing", "False", "Stopped"), ("Degraded", "False", "Stopped"),
    ]  # fmt: skip
