"""The process driver: units as supervised local processes.

Each unit runs in its own session (so Ctrl-C in a terminal reaches only the operator, which then
stops them in order), logs to `STATE/logs/UNIT.log`, and is recorded in `STATE/units/UNIT.json`
(pid, the kernel's start time of that pid, the unit as started). A new operator reads those records
and ADOPTS the processes still running instead of starting them twice; the start time guards against
a recycled pid. Restarts and their backoff are the plan's decision; this module only starts, stops,
observes, and keeps the failure count.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tightwad.logs import telling_line
from tightwad.operator import health
from tightwad.operator.commands import Binaries, CannotRun, command, environment
from tightwad.operator.modelcheck import ModelChecker, ModelUnavailable, locate
from tightwad.operator.observed import Health, ModelCheck, ModelKey, UnitState
from tightwad.operator.units import ENGINE_ROUTER, KIND_ORDER, ModelRef, Unit
from tightwad.ports import in_use

STABLE_S = 30.0  # healthy this long after a start and the failure count is forgiven
LOG_ROTATE_BYTES = 20 * 2**20


@dataclass
class Record:
    """What the driver remembers about one unit, on disk."""

    unit: dict[str, Any]
    pid: int | None
    proc_start: int | None
    started_at: float
    log: str
    failures: int = 0
    exited_at: float | None = None
    exit_code: int | None = None
    error: str | None = None


def proc_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot): a pid's identity over time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None  # a zombie is dead, whatever kill(0) says
    return int(fields[19])


def exit_reason(path: Path, limit_bytes: int = 16384) -> str | None:
    """What a unit's log says went wrong, for `error` in status: the telling line of its last
    start, not merely the last line (llama.cpp's rpc server prints its reason, then more)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("=== ")]
    return telling_line(lines[starts[-1] + 1 :] if starts else lines)


class ProcessDriver:
    """Runs the units of the hosts it is given on this machine."""

    runtime = "process"

    def __init__(
        self,
        state_dir: Path,
        checker: ModelChecker,
        binaries: Binaries | None = None,
        *,
        stop_timeout: float = 15.0,
        probe: Callable[[Unit], health.Probe] | None = None,
        manifest_path: str | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.manifest_path = manifest_path  # handed to units that read the manifest themselves
        self.units_dir = state_dir / "units"
        self.logs_dir = state_dir / "logs"
        self.units_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.checker = checker
        self.binaries = binaries or Binaries()
        self.stop_timeout = stop_timeout
        self.probe = probe or (lambda unit: health.probe(unit, local=True))
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.health: dict[str, tuple[Health, float]] = {}
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")

    # -- records ---------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.units_dir / f"{name}.json"

    def records(self) -> dict[str, Record]:
        out = {}
        for path in sorted(self.units_dir.glob("*.json")):
            try:
                out[path.stem] = Record(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # half-written by a crash: the unit will simply be started again
        return out

    def _save(self, name: str, record: Record) -> None:
        tmp = self._path(name).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record), indent=1))
        os.replace(tmp, self._path(name))

    def alive(self, name: str, record: Record) -> bool:
        if record.pid is None:
            return False
        child = self.children.get(name)
        if child is not None and child.pid == record.pid:
            if child.poll() is None:
                return True
            record.exit_code = child.returncode
            return False
        return record.proc_start is not None and proc_start_time(record.pid) == record.proc_start

    # -- observe ---------------------------------------------------------------------------------

    def observe(self, now: float) -> dict[str, UnitState]:
        records = self.records()
        alive = {name: self.alive(name, record) for name, record in records.items()}
        units = {name: Unit.from_json(record.unit) for name, record in records.items()}
        probes = dict(
            zip(
                [n for n in records if alive[n]],
                self.pool.map(self.probe, [units[n] for n in records if alive[n]]),
                strict=True,
            )
        )
        states: dict[str, UnitState] = {}
        for name, record in records.items():
            unit = units[name]
            if alive[name]:
                result = probes[name]
                state = self._track(name, result.health, now)
                if state is Health.OK and record.failures and now - record.started_at >= STABLE_S:
                    record.failures = 0
                    self._save(name, record)
                states[name] = UnitState(
                    unit=unit,
                    running=True,
                    health=result.health,
                    started_at=record.started_at,
                    since=self.health[name][1],
                    failures=record.failures,
                    error=result.error if result.health is not Health.OK else None,
                    adopted=name not in self.children,
                    route=result.body.get("unit") if unit.name == ENGINE_ROUTER else None,
                    inflight=dict(result.body.get("inflight") or {}) if unit.name == ENGINE_ROUTER else {},
                    detail={"pid": record.pid, "log": record.log},
                )
                continue
            if record.exited_at is None:  # noticed just now
                record.exited_at = now
                record.error = exit_reason(Path(record.log)) or record.error
                self._save(name, record)
                self.children.pop(name, None)
            self.health.pop(name, None)
            states[name] = UnitState(
                unit=unit,
                running=False,
                health=Health.DOWN,
                started_at=record.started_at,
                failures=record.failures,
                exited_at=record.exited_at,
                exit_code=record.exit_code,
                error=record.error,
                detail={"pid": record.pid, "log": record.log},
            )
        return states

    def _track(self, name: str, state: Health, now: float) -> Health:
        previous = self.health.get(name)
        if previous is None or previous[0] is not state:
            self.health[name] = (state, now)
        return state

    # -- act -------------------------------------------------------------------------------------

    def model_paths(self, unit: Unit) -> dict[str, str]:
        paths = {}
        for ref in unit.models:
            path = self.checker.path(unit.host, ref)
            if path is None:
                try:
                    path = str(
                        locate(ref, self.checker.base_dir, self.checker.model_dirs.get(unit.host), False)
                    )
                except ModelUnavailable as exc:
                    raise CannotRun(f"model {ref.name}: {exc}") from None
            paths[ref.name] = path
        return paths

    def start(self, unit: Unit, reason: str, failed: bool = False) -> None:
        previous = self.records().get(unit.name)
        if previous is not None and self.alive(unit.name, previous):
            self._terminate(unit.name, previous)
        failures = (previous.failures + 1) if (previous and failed) else 0
        log = self.logs_dir / f"{unit.name}.log"
        if log.exists() and log.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(log, log.with_suffix(".log.1"))
        now = time.time()
        record = Record(
            unit=unit.to_json(), pid=None, proc_start=None, started_at=now, log=str(log), failures=failures
        )
        try:
            cmd = command(unit, self.binaries, self.model_paths(unit), self.manifest_path)
            # A port held by someone else fails the start plainly (and says who), instead of a
            # server that exits with a vague message or, like ggml-rpc-server, with code 0.
            if unit.port is not None and (
                taken := in_use(str(unit.spec.get("bind") or "0.0.0.0"), unit.port)
            ):
                raise CannotRun(taken)
        except CannotRun as exc:
            record.exited_at, record.error = now, str(exc)
            self._save(unit.name, record)
            return
        with log.open("ab") as out:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            out.write(f"=== {stamp} start ({reason}): {' '.join(cmd)}\n".encode())
            out.flush()
            try:
                child = subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **environment(unit, self.binaries)},
                    start_new_session=True,  # its own process group: Ctrl-C and our stop reach it alone
                )
            except OSError as exc:
                record.exited_at, record.error = now, f"cannot run {cmd[0]}: {exc.strerror or exc}"
                self._save(unit.name, record)
                return
        self.children[unit.name] = child
        record.pid, record.proc_start = child.pid, proc_start_time(child.pid)
        self._save(unit.name, record)
        self.health.pop(unit.name, None)

    def stop(self, unit: Unit, reason: str = "") -> None:
        record = self.records().get(unit.name)
        if record is None:
            return
        if self.alive(unit.name, record):
            self._terminate(unit.name, record)
        with contextlib.suppress(FileNotFoundError):
            self._path(unit.name).unlink()
        self.children.pop(unit.name, None)
        self.health.pop(unit.name, None)

    def _terminate(self, name: str, record: Record) -> None:
        """SIGTERM the unit's process group, then SIGKILL what is left after the timeout."""
        assert record.pid is not None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, sig)
            deadline = time.monotonic() + (self.stop_timeout if sig == signal.SIGTERM else 5.0)
            while time.monotonic() < deadline:
                if not self.alive(name, record):
                    return
                time.sleep(0.05)

    def stop_all(self, names: Iterable[str] | None = None) -> list[str]:
        """Stop every unit (or those named), front door first, workers last."""
        records = self.records()
        wanted = [n for n in records if names is None or n in names]
        wanted.sort(key=lambda n: -KIND_ORDER[Unit.from_json(records[n].unit).kind])
        for name in wanted:
            self.stop(Unit.from_json(records[name].unit))
        return wanted

    def verify(self, host: str, model: ModelRef) -> None:
        self.checker.request(host, model)

    def models(self) -> dict[ModelKey, ModelCheck]:
        return self.checker.results()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.checker.close()
