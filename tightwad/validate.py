"""`tightwad validate FILE...`: check manifests and print every problem where an editor can jump to it."""

from __future__ import annotations

import os
import re

from rich.console import Console

from tightwad.manifest import Manifest, ManifestError, load_manifest

_UNSET = re.compile(r"environment variable (\w+) is not set")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _load_allowing_unset_secrets(path: str) -> tuple[Manifest, set[str]]:
    """Validation often runs where the secrets are not (CI, a laptop): when the only problems are
    unset variables, the manifest is valid with them filled in, and they are named as a note.
    Running it (`tightwad up`) still refuses until they are set."""
    try:
        return load_manifest(path), set()
    except ManifestError as exc:
        unset = {m.group(1) for p in exc.problems if (m := _UNSET.search(p.message))}
        if not unset or len(unset) != len(exc.problems):
            raise
        placeholders = {name: "set-at-run-time" for name in unset}
        try:
            return load_manifest(path, environ={**os.environ, **placeholders}), unset
        except ManifestError:
            raise exc from None


def validate_files(paths: list[str]) -> int:
    """Validate each file; 0 when all are valid, 2 when any is not (every problem printed)."""
    # soft_wrap: one problem per line whatever the terminal width, so `FILE:LINE:COL:` stays greppable.
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    all_valid = True
    for path in paths:
        try:
            manifest, unset = _load_allowing_unset_secrets(path)
        except ManifestError as exc:
            all_valid = False
            for problem in exc.problems:
                console.print(problem.format(path), style="red", markup=False)
            continue
        summary = (
            f"{path}: ok ({_count(len(manifest.hosts), 'host')}, "
            f"{_count(len(manifest.models), 'model')}, target {manifest.target.model})"
        )
        console.print(summary, style="green", markup=False)
        if unset:
            names = ", ".join(sorted(unset))
            console.print(f"{path}: note: set {names} in the environment before running it", style="yellow")
    return 0 if all_valid else 2
