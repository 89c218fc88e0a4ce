"""The dashboard's admission cards (conversations busy / size, waiting, the queue's bound and timeout,
503 refusals, the recent mean wait) drawn from what telemetry really reports: the page's own script
runs under node with a few lines standing in for the DOM, so no browser is needed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest

from tightwad.proxy.dashboard import DASHBOARD_HTML
from tightwad.proxy.telemetry import Telemetry

SCRIPT = DASHBOARD_HTML.split("<script>", 1)[1].split("</script>", 1)[0]
ADMISSION_IDS = ("busy", "waiting", "bound", "refused", "wait")

# Elements are plain objects keyed by id; `show(stats)` fills them, and their text is printed.
DOM = """
const vm = require("vm");
const [script, stats, ids] = JSON.parse(require("fs").readFileSync(0, "utf8"));
const elements = {};
const element = () => ({
  textContent: "", className: "", hidden: false, addEventListener() {},
  append() {}, replaceChildren() {}, querySelector() { return element(); },
});
const document = {
  getElementById: (id) => (elements[id] = elements[id] || element()),
  createElement: () => element(),
};
const context = vm.createContext({ document });
vm.runInContext(script, context);
context.show(stats);
console.log(JSON.stringify(Object.fromEntries(ids.map((id) => [id, String(elements[id].textContent)]))));
"""


def drawn(stats: dict[str, Any]) -> dict[str, str]:
    """The admission cards' text after the page's `show(stats)`."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the page's script needs a JavaScript runtime")
    result = subprocess.run(
        [node, "-e", DOM],
        input=json.dumps([SCRIPT, stats, ADMISSION_IDS]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def stats_of(telemetry: Telemetry) -> dict[str, Any]:
    return {"mode": "speculate", "model": "tiny", **telemetry.snapshot(), "pool": {"ok": True}}


def test_every_admission_card_is_on_the_page() -> None:
    for name in ADMISSION_IDS:
        assert f'id="{name}"' in DASHBOARD_HTML


def test_the_page_reads_only_admission_fields_that_telemetry_reports() -> None:
    telemetry = Telemetry()
    telemetry.admission(size=2, busy=1, waiting=0, limit=16, timeout=30.0)
    reported = set(telemetry.snapshot()["admission"])
    read = set(re.findall(r"\badm\.(\w+)", SCRIPT))
    assert read and read <= reported, f"the page reads {sorted(read - reported)}, which stats lack"


def test_the_cards_show_busy_waiting_bounds_refusals_and_the_wait() -> None:
    telemetry = Telemetry()
    telemetry.admission(size=2, busy=2, waiting=3, limit=12, timeout=7.5)
    telemetry.refused("queue_full")
    telemetry.refused("queue_full")
    telemetry.refused("queue_timeout")
    telemetry.waited(0.25)
    assert drawn(stats_of(telemetry)) == {
        "busy": "2 / 2",
        "waiting": "3",
        "bound": "12 / 7.5 s",
        "refused": "2 / 1",
        "wait": "250 ms",
    }


def test_before_the_engine_is_learnt_the_cards_say_nothing_is_known() -> None:
    # Passthrough, or a speculating proxy before its first request: no pool sized, nobody refused.
    assert drawn(stats_of(Telemetry())) == {
        "busy": "-",
        "waiting": "-",
        "bound": "-",
        "refused": "0 / 0",
        "wait": "-",
    }
