"""The line of a log that says what went wrong, not merely the last one."""

from __future__ import annotations

from tightwad.logs import telling_line


def test_the_rpc_servers_real_reason_wins_over_its_last_line() -> None:
    log = [
        "=== 2026-12-03 15:00:00 start (create): ggml-rpc-server --host 127.0.0.1 --port 50152",
        "create_backend: using CPU backend",
        "Starting RPC server v3.0.0",
        "  endpoint       : 127.0.0.1:50152",
        "Failed to create server socket",
        "transport : TCP",
    ]
    assert telling_line(log) == "Failed to create server socket"


def test_a_python_traceback_gives_its_exception_line() -> None:
    log = ["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: bad model path"]
    assert telling_line(log) == "ValueError: bad model path"


def test_without_an_error_line_the_last_line_is_shown() -> None:
    assert telling_line(["loading model", "", "listening on 8080"]) == "listening on 8080"
    assert telling_line(["=== start", "  "]) is None


def test_lines_that_only_mention_errors_are_not_the_reason() -> None:
    assert (
        telling_line(["fatal: model not found", "served 10 requests, 0 errors"]) == "fatal: model not found"
    )
