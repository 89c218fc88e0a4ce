"""Is a model present on this machine, and is it the right file? Checked before anything needs it.

A model is usable when its file exists where the unit will read it, starts with the GGUF magic, and
matches its SHA-256 (the manifest's, or for a catalog model the one `tightwad models fetch`
recorded). Hashing a big file takes a while, so it runs in the background: until it is done the
check says CHECKING. Digests are remembered by (path, size, mtime), so an unchanged file is hashed
once, across operator restarts too.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from tightwad.errors import TightwadError
from tightwad.operator.observed import ModelCheck, ModelKey, ModelState
from tightwad.operator.units import ModelRef

GGUF_MAGIC = b"GGUF"
RECHECK_MISSING_S = 5.0


class ModelUnavailable(TightwadError):
    """The file is not where it should be; the message says what to do."""


def locate(ref: ModelRef, base_dir: Path | None, model_dir: str | None, swarm: bool) -> Path:
    """Where `ref` lives on this machine."""
    from tightwad import models  # here: it brings numpy and rich, which a dry run never needs

    if ref.source.startswith(models.CATALOG_PREFIX):
        try:
            return models.resolve(ref.source.removeprefix(models.CATALOG_PREFIX))
        except TightwadError as exc:
            raise ModelUnavailable(str(exc)) from None
    if re.match(r"^https?://", ref.source, flags=re.IGNORECASE):
        folder = Path(model_dir or "/var/lib/tightwad/models").expanduser()
        path = folder / Path(urlparse(ref.source).path).name
        if not path.is_file():
            how = "the swarm sidecar is fetching it" if swarm else "enable spec.swarm or copy the file there"
            raise ModelUnavailable(f"not in {folder} yet; {how}")
        return path
    try:
        return models.resolve_source(ref.source, base_dir)
    except TightwadError as exc:
        raise ModelUnavailable(str(exc)) from None


def _expected_sha(ref: ModelRef, path: Path) -> str | None:
    from tightwad import models

    if ref.sha256:
        return ref.sha256
    if ref.source.startswith(models.CATALOG_PREFIX):
        record = models.load_records(path.parent).get(ref.source.removeprefix(models.CATALOG_PREFIX))
        return record.sha256 if record else None
    return None


class ModelChecker:
    """Checks models on this machine for one driver; thread-safe."""

    def __init__(
        self,
        base_dir: Path | None,
        model_dirs: dict[str, str | None] | None = None,
        *,
        swarm: bool = False,
        cache_file: Path | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.model_dirs = dict(model_dirs or {})
        self.swarm = swarm
        self.cache_file = cache_file
        self._lock = threading.Lock()
        self._checks: dict[ModelKey, tuple[ModelCheck, tuple[str, int, int] | None]] = {}
        self._running: set[ModelKey] = set()
        self._rechecked: dict[ModelKey, float] = {}
        self._digests: dict[str, str] = self._load_cache()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-check")

    def configure(self, base_dir: Path | None, model_dirs: dict[str, str | None], swarm: bool) -> None:
        """A new manifest: where relative paths and URL downloads live may have moved."""
        with self._lock:
            if (base_dir, model_dirs, swarm) != (self.base_dir, self.model_dirs, self.swarm):
                self._checks.clear()
            self.base_dir, self.model_dirs, self.swarm = base_dir, dict(model_dirs), swarm

    def request(self, host: str, ref: ModelRef) -> None:
        """Start checking `ref` on `host` (a no-op while a check is running or its answer stands)."""
        key = (host, ref)
        with self._lock:
            if key in self._checks:
                return
            self._checks[key] = (ModelCheck(ModelState.CHECKING), None)
        self._submit(key)

    def _submit(self, key: ModelKey) -> None:
        with self._lock:
            if key in self._running:
                return
            self._running.add(key)
        self._pool.submit(self._check, key)

    def _recheck(self, key: ModelKey) -> None:
        now = time.monotonic()
        if now - self._rechecked.get(key, 0.0) >= RECHECK_MISSING_S:
            self._rechecked[key] = now
            self._submit(key)

    def results(self) -> dict[ModelKey, ModelCheck]:
        """Every answer that still holds: a file that changed since it was checked is dropped, so
        the plan asks again."""
        out: dict[ModelKey, ModelCheck] = {}
        with self._lock:
            items = list(self._checks.items())
        for key, (check, stamp) in items:
            if stamp is not None and _stamp(Path(stamp[0])) != stamp:
                with self._lock:
                    self._checks.pop(key, None)
                continue
            if check.state is ModelState.MISSING:
                self._recheck(key)  # it may arrive (the swarm, a copy); the old answer stands meanwhile
            out[key] = check
        return out

    def path(self, host: str, ref: ModelRef) -> str | None:
        with self._lock:
            check = self._checks.get((host, ref))
        return check[0].path if check and check[0].state is ModelState.OK else None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the work --------------------------------------------------------------------------------

    def _check(self, key: ModelKey) -> None:
        host, ref = key
        try:
            result, stamp = self._verify(ref, self.model_dirs.get(host))
        except Exception as exc:  # a check must always end, or the plan waits forever
            result, stamp = ModelCheck(ModelState.BAD, reason=f"could not check it: {exc}"), None
        with self._lock:
            self._running.discard(key)
            if key in self._checks:
                self._checks[key] = (result, stamp)

    def _verify(self, ref: ModelRef, model_dir: str | None) -> tuple[ModelCheck, tuple[str, int, int] | None]:
        try:
            path = locate(ref, self.base_dir, model_dir, self.swarm)
        except ModelUnavailable as exc:
            return ModelCheck(ModelState.MISSING, reason=str(exc)), None
        stamp = _stamp(path)
        if stamp is None:
            return ModelCheck(ModelState.MISSING, reason=f"{path} vanished"), None
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                return ModelCheck(ModelState.BAD, path=str(path), reason=f"{path} is not a GGUF file"), stamp
        expected = _expected_sha(ref, path)
        if expected:
            actual = self._digest(path, stamp)
            if actual != expected:
                reason = (
                    f"sha256 of {path} is {actual[:12]}…, the manifest says {expected[:12]}…; "
                    "fix spec.models[].sha256 or replace the file"
                )
                return ModelCheck(ModelState.BAD, size=stamp[1], path=str(path), reason=reason), stamp
        return ModelCheck(ModelState.OK, size=stamp[1], path=str(path)), stamp

    def _digest(self, path: Path, stamp: tuple[str, int, int]) -> str:
        key = "|".join(map(str, stamp))
        with self._lock:
            known = self._digests.get(key)
        if known:
            return known
        from tightwad import models

        digest = models.sha256_file(path)
        with self._lock:
            self._digests[key] = digest
            self._save_cache()
        return digest

    def _load_cache(self) -> dict[str, str]:
        if self.cache_file is None:
            return {}
        try:
            data = json.loads(self.cache_file.read_text())
            return {str(k): str(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_cache(self) -> None:
        if self.cache_file is None:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._digests, indent=1))
        os.replace(tmp, self.cache_file)


def _stamp(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path), st.st_size, st.st_mtime_ns
