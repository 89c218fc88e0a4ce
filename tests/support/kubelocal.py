"""Starting and stopping the loopback Kubernetes pieces of the tests (scripts/start-*.sh, which share
scripts/lib/kube-local.sh): one way to run either start script, fail the test with the script's own
words and the command that builds what is missing, and stop what it started."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from . import ROOT

SCRIPTS = ROOT / "scripts"


def start(
    script: str,
    folder: Path,
    args: Sequence[str] = (),
    *,
    what: str,
    build: str,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Run `scripts/<script> FOLDER ARGS...`; the kubeconfig it prints (its last line)."""
    result = subprocess.run(
        [str(SCRIPTS / script), str(folder), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if result.returncode != 0:
        pytest.fail(
            f"could not start {what} (build it with `make kube` or {build}):\n{result.stderr}", pytrace=False
        )
    return Path(result.stdout.strip().splitlines()[-1])


def stop(script: str, folder: Path, timeout: float = 300) -> None:
    """Stop what the script started in `folder` (by the pid files it wrote)."""
    subprocess.run([str(SCRIPTS / script), "--stop", str(folder)], check=False, timeout=timeout)
