"""The operator's command line: up, down, status, plan, reconcile, swap, agent.

tightwad up FILE [--keep-running]      converge and keep watching FILE (foreground; Ctrl-C stops)
tightwad down FILE                     stop every unit of FILE's cluster on this machine
tightwad status [FILE] [--json]        the status table (default: the cluster `up` ran last)
tightwad plan FILE                     dry run: what the next pass would do
tightwad reconcile FILE --once         one pass, then exit (units keep running)
tightwad swap MODEL FILE               set spec.target.model in FILE; the loop does the rest
tightwad agent --host NAME --manifest FILE|URL [--operator URL]
                                       run one host's units for an operator elsewhere
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tightwad.cli import LazyConsole
from tightwad.errors import TightwadError

err = LazyConsole(highlight=False, soft_wrap=True)


def _up(args: argparse.Namespace) -> int:
    from tightwad.operator.up import up

    return up(args.manifest, keep_running=args.keep_running, agents_listen=args.agents)


def _down(args: argparse.Namespace) -> int:
    from tightwad.operator.reconcile import Reconciler

    reconciler = Reconciler(args.manifest)
    try:
        stopped = reconciler.stop_all("`tightwad down` stopped every unit")
    finally:
        reconciler.close()
    err.print(f"stopped {len(stopped)} unit(s)" + (f": {', '.join(stopped)}" if stopped else ""))
    return 0


def _status_file(manifest: str | None) -> Path:
    from tightwad.operator.reconcile import state_root
    from tightwad.operator.status import status_path_for

    if manifest:
        path = Path(manifest)
        return path if path.name.endswith(".status.json") else status_path_for(path.resolve())
    pointer = state_root() / "last-status"
    if pointer.exists():
        return Path(pointer.read_text().strip())
    raise TightwadError("no cluster has been brought up here yet; give the manifest: tightwad status FILE")


def _status(args: argparse.Namespace) -> int:
    from tightwad.operator.show import print_status
    from tightwad.operator.status import StatusFile

    path = _status_file(args.manifest)
    doc = StatusFile.read(path)
    if doc is None:
        raise TightwadError(f"no status at {path}; run `tightwad up` on the manifest first")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_status(doc)
    ready = next((c for c in doc.get("conditions", []) if c["type"] == "Ready"), {})
    return 0 if ready.get("status") == "True" else 3


def _plan(args: argparse.Namespace) -> int:
    from tightwad.operator.plan import Route, Start, Stop, VerifyModel, plan
    from tightwad.operator.reconcile import Reconciler

    # Read-only, so fine beside a running `up`; a dry run: it contacts no Docker daemon or host.
    reconciler = Reconciler(args.manifest, lock=False, dry_run=True)
    try:
        if reconciler.desired is None:
            raise TightwadError(f"{args.manifest}: {reconciler.manifest_error}")
        observed = reconciler.observe(time.time())
        result = plan(reconciler.desired, observed, scope=reconciler.scope())
    finally:
        reconciler.close()
    for action in result.actions:
        match action:
            case Start(unit=unit, reason=reason):
                print(f"start  {unit.name:<24} on {unit.host:<12} {reason}")
            case Stop(unit=unit, reason=reason):
                print(f"stop   {unit.name:<24} on {unit.host:<12} {reason}")
            case Route(router=router, backend=backend, reason=reason):
                print(f"route  {router.name:<24} -> {backend.name} ({reason})")
            case VerifyModel(host=host, model=model):
                print(f"verify {model.name:<24} on {host}")
    for name, why in result.waiting.items():
        print(f"wait   {name:<24} {why}")
    for problem in result.problems:
        print(f"problem {problem.reason}: {problem.message}")
    if reconciler.unobserved:
        hosts = sorted(reconciler.unobserved)
        shown = ", ".join(hosts[:5]) + (f" and {len(hosts) - 5} more" if len(hosts) > 5 else "")
        print(f"unseen {len(hosts)} docker host(s) ({shown}): a dry run contacts no daemon")
    if not result.actions and not result.waiting:
        print("nothing to do" + (": converged" if result.converged else ""))
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    from tightwad.operator.reconcile import Reconciler

    if not args.once:
        raise TightwadError(
            "`tightwad reconcile` runs one pass: add --once (or use `tightwad up` to keep going)"
        )
    reconciler = Reconciler(args.manifest, events=lambda line: err.print(line))
    try:
        result = reconciler.pass_once()
    finally:
        reconciler.close()
    ready = next((c for c in result.status.get("conditions", []) if c["type"] == "Ready"), {})
    return 0 if ready.get("status") == "True" else 3


def _swap(args: argparse.Namespace) -> int:
    from tightwad.operator.swap import swap

    swap(Path(args.manifest), args.model)
    err.print(f"{args.manifest}: spec.target.model is now {args.model}; a running `tightwad up` swaps it in")
    return 0


def _agent(args: argparse.Namespace) -> int:
    from tightwad.operator.agent import run_agent

    return run_agent(host=args.host, manifest=args.manifest, operator=args.operator, token=args.token)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tightwad", description="Converge hosts to a cluster manifest.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="converge and keep watching the manifest (foreground; Ctrl-C stops)")
    p.add_argument("manifest", metavar="FILE")
    p.add_argument("--keep-running", action="store_true", help="on exit, leave the units running")
    p.add_argument(
        "--agents",
        metavar="ADDR:PORT",
        default=None,
        help="where agents reach the operator (default, when the manifest has agent hosts: port 8090)",
    )
    p.set_defaults(handler=_up)

    p = sub.add_parser("down", help="stop every unit of the manifest's cluster on this machine")
    p.add_argument("manifest", metavar="FILE")
    p.set_defaults(handler=_down)

    p = sub.add_parser("status", help="show conditions and units from the status file")
    p.add_argument("manifest", metavar="FILE", nargs="?", help="the manifest (or its .status.json)")
    p.add_argument("--json", action="store_true", help="print the status document itself")
    p.set_defaults(handler=_status)

    p = sub.add_parser("plan", help="dry run: print what the next pass would do")
    p.add_argument("manifest", metavar="FILE")
    p.set_defaults(handler=_plan)

    p = sub.add_parser("reconcile", help="one reconcile pass")
    p.add_argument("manifest", metavar="FILE")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.set_defaults(handler=_reconcile)

    p = sub.add_parser("swap", help="hot-swap the target model (edits the manifest)")
    p.add_argument("model", metavar="MODEL", help="a model name from spec.models")
    p.add_argument("manifest", metavar="FILE")
    p.set_defaults(handler=_swap)

    p = sub.add_parser("agent", help="run one host's units and report them to the operator")
    p.add_argument("--host", required=True, help="the host's name in the manifest")
    p.add_argument("--manifest", required=True, help="the manifest file, or the operator's URL")
    p.add_argument(
        "--operator", default=None, help="operator URL to report to (default: from --manifest URL)"
    )
    p.add_argument("--token", default=None, help="bearer token (default: TIGHTWAD_TOKEN)")
    p.set_defaults(handler=_agent)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.handler(args))
    except TightwadError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        return 1
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handling
        return 130


if __name__ == "__main__":
    sys.exit(main())
