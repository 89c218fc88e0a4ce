"""Helpers shared by the test packages: real processes, real engines, fakes at the HTTP boundary."""

from pathlib import Path

# The repository root, for tests that read examples/, charts/ or the Dockerfiles.
ROOT = Path(__file__).resolve().parents[2]
