"""The `tightwad` command line: one entry point, each subcommand a thin call into its module."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from tightwad import __version__

if TYPE_CHECKING:
    from rich.console import Console


class LazyConsole:
    """rich's Console on stderr, made on its first use: importing rich takes some 40 ms, which a
    command that prints nothing there (`tightwad plan`, say) need not pay at every start."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self._console: Console | None = None

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, **self.options)
        self._console.print(*objects, **kwargs)


err = LazyConsole(highlight=False)


def _quiet_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(130)


def _while_starting() -> None:
    """Ctrl-C while a command is still importing its modules ends it quietly (exit 130), never with
    a traceback; also the cure for a SIGINT that a background job or CI runner left ignored."""
    signal.signal(signal.SIGINT, _quiet_exit)


def _started() -> None:
    """Imports are done: the command's own Ctrl-C handling (KeyboardInterrupt) applies from here."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _validate(args: argparse.Namespace) -> int:
    from tightwad.validate import validate_files

    return validate_files(args.files)


def _toolchain(args: argparse.Namespace) -> int:
    from tightwad import toolchain

    if args.action == "build":
        print(toolchain.build().prefix)
        return 0
    tc = toolchain.find()
    if args.action == "path":
        print(tc.prefix)
    else:  # env: for `eval "$(tightwad toolchain env)"`
        for name, value in tc.env().items():
            print(f"export {name}={value}")
        print(f"export PATH={tc.prefix / 'bin'}:$PATH")
    return 0


def _models(args: argparse.Namespace) -> int:
    from tightwad import models

    if args.action == "fetch":
        return models.fetch_command(args.names or None, verify=args.verify)
    return models.list_command()


def _benchmark(args: argparse.Namespace) -> int:
    from tightwad import benchmark

    return benchmark.command(
        args.manifest,
        proxy=args.proxy,
        target=args.target,
        prompts_file=args.prompts,
        max_tokens=args.tokens,
        runs=args.runs,
        as_json=args.json,
        token=args.token,
        model=args.model,
        warmup=args.warmup,
    )


COMPONENTS = {
    "engine": "run the coordinator on libllama across the rpc pool",
    "proxy": "run or query the speculative front door (start, status)",
    "swarm": "distribute model files peer to peer (seed, pull, status, sidecar)",
    "gate": "run the quality gate: `gate start` is `proxy start` with --gate-agent/--gate-reviewer flags",
}


# The reconcile loop's commands, handled by tightwad.operator.cli with the subcommand kept.
OPERATOR_COMMANDS = {
    "up": "bring a cluster manifest up and keep it converged (foreground; Ctrl-C stops it)",
    "down": "stop every unit a manifest's `up` started",
    "status": "show a cluster's units and conditions as a table",
    "plan": "print what `up` would do now, without doing it",
    "reconcile": "converge once (--once) or keep converging",
    "swap": "hot-swap the target model",
    "agent": "run one host's units for a remote operator (what `nix run .#worker` starts)",
    "operator": "watch TightwadCluster resources in Kubernetes and converge the cluster to them",
}


def _component(name: str, argv: list[str]) -> int:
    """Each component owns its argument parsing (and --help); this only hands the rest of argv over."""
    import importlib

    if name == "operator":  # the in-cluster Kubernetes controller (what the Helm chart runs)
        module, args = "tightwad.operator.kubernetes.controller", argv
    elif name == "gate":  # the gate is served by the proxy process (POST /tightwad/v1/gate/...)
        module, args = "tightwad.proxy.cli", ["start", *(argv[1:] if argv[:1] == ["start"] else argv)]
    elif name in OPERATOR_COMMANDS:
        module, args = "tightwad.operator.cli", [name, *argv]
    else:
        module, args = f"tightwad.{name}.cli", argv
    entry = importlib.import_module(module).main
    _started()
    return int(entry(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tightwad",
        description="Pool mismatched GPUs and CPUs into one OpenAI-compatible endpoint.",
    )
    parser.add_argument("--version", action="version", version=f"tightwad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check cluster manifests and print every error with its place")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(handler=_validate)

    p = sub.add_parser("toolchain", help="build or locate the pinned llama.cpp build")
    p.add_argument("action", choices=["build", "path", "env"])
    p.set_defaults(handler=_toolchain)

    p = sub.add_parser("models", help="fetch the real models used by examples, tests and benchmarks")
    p.add_argument("action", choices=["fetch", "list"])
    p.add_argument(
        "names", nargs="*", metavar="NAME", help="catalog models to fetch (default: all but opt-in)"
    )
    p.add_argument("--verify", action="store_true", help="re-hash every file instead of trusting size+mtime")
    p.set_defaults(handler=_models)

    p = sub.add_parser(
        "benchmark",
        help="measure the target alone vs speculation on a running cluster; check outputs are identical",
    )
    p.add_argument(
        "manifest", nargs="?", metavar="FILE", help="the cluster manifest (finds proxy and engine)"
    )
    p.add_argument("--proxy", metavar="URL", help="the proxy's URL (instead of a manifest)")
    p.add_argument("--target", metavar="URL", help="the engine's own URL: the target alone")
    p.add_argument(
        "--prompts", metavar="FILE", help="one prompt per line, or a .json list (default: built-in)"
    )
    p.add_argument("--tokens", type=int, default=128, help="completion tokens per reply (default 128)")
    p.add_argument("--runs", type=int, default=1, help="runs per prompt and side; the median is kept")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--token", help="bearer token (default: the manifest's, or $TIGHTWAD_TOKEN)")
    p.add_argument("--model", help="the model name to send (default: the server's own)")
    p.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=True, help="one short request first"
    )
    p.set_defaults(handler=_benchmark)

    for name, help_text in {**COMPONENTS, **OPERATOR_COMMANDS}.items():
        sub.add_parser(name, help=help_text, add_help=False)  # listed in --help; dispatched in main()

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _while_starting()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and (argv[0] in COMPONENTS or argv[0] in OPERATOR_COMMANDS):
        return _component(argv[0], argv[1:])
    _started()
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear one-line error, never a traceback, for anything we raise
        from tightwad.errors import TightwadError

        if isinstance(exc, TightwadError | RuntimeError | OSError):
            err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
