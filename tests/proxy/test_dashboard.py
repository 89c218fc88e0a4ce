"""The dashboard in a real headless browser (Debian chromium + playwright-core from npm): the page
holds no data, a wrong token gets nothing, the right one shows live numbers that move after a
request, and a screenshot is saved. The proxy needs a token (no unauthenticated backdoor)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from support.engines import EngineProcess
from support.procs import Processes
from support.proxies import TOKEN, start_proxy

from tightwad.toolchain import cache_root

pytestmark = [pytest.mark.integration, pytest.mark.system]  # needs chromium and node

HERE = Path(__file__).parent
PLAYWRIGHT = Path(
    os.environ.get("TIGHTWAD_PLAYWRIGHT", cache_root() / "playwright/node_modules/playwright-core")
)


def browser_tools() -> tuple[str, str, Path]:
    node, chromium = shutil.which("node"), shutil.which("chromium")
    if not node or not chromium or not (PLAYWRIGHT / "package.json").exists():
        pytest.fail(
            "the dashboard test needs node, Debian's chromium (apt-get install chromium) and playwright-core "
            f"(npm install playwright-core in {PLAYWRIGHT.parent.parent}, or set TIGHTWAD_PLAYWRIGHT)"
        )
    return node, chromium, PLAYWRIGHT


def test_dashboard_logs_in_with_the_token_and_numbers_move(
    local_engine: EngineProcess, processes: Processes, tmp_path: Path
) -> None:
    node, chromium, playwright = browser_tools()
    proxy = start_proxy(processes, local_engine.url, "--draft-kind", "ngram")
    # No backdoor: the page is open but holds no numbers; the events need the token.
    page = httpx.get(f"{proxy.url}/dashboard", timeout=10)
    assert page.status_code == 200 and "tok/s" in page.text and local_engine.url not in page.text
    assert httpx.get(f"{proxy.url}/tightwad/v1/events", timeout=10).status_code == 401
    shot = tmp_path / "dashboard.png"
    result = subprocess.run(
        [
            node,
            str(HERE / "browser" / "dashboard.js"),
            str(playwright),
            chromium,
            proxy.url,
            TOKEN,
            str(shot),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert "token" in seen["wrong"] and seen["hiddenAfterWrong"] is True
    assert seen["statusCode"] == 200 and seen["after"] > seen["before"]
    assert int(seen["generated"]) > 0 and "engine ok" in seen["pool"] and "completions" in seen["recent"]
    # Admission, sized from the engine's stats once the request was speculated: nobody holds a
    # conversation after the reply, nobody waits or was refused, and the bounds are the engine's.
    engine = local_engine.get("/tightwad/v1/stats").json()
    assert seen["busy"] == f"0 / {engine['parallel']}" and seen["waiting"] == "0"
    assert seen["bound"] == f"{engine['queue_limit']} / {engine['queue_timeout']:g} s"
    assert seen["refused"] == "0 / 0"
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 1100 and height >= 600
    keep = os.environ.get("TIGHTWAD_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "dashboard.png")
