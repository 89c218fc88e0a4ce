"""Files for tests and benchmarks: random bytes, tiny GGUFs, and new versions of a GGUF (a metadata
edit, or some tensors re-quantised) written the way real tools write them, so delta updates can be
measured on real layouts. The tensor data is copied or converted with the `gguf` package. Used by
the swarm tests and bench/swarm.py; nothing in the shipped package needs it."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize, quant_shape_to_byte_shape, quantize

from tightwad.swarm.gguf_layout import GGUFLayout, TensorSpan, read_layout


def random_file(path: Path, size: int, seed: int = 0) -> Path:
    """`size` pseudo-random bytes (deterministic per seed), written in 4 MiB blocks."""
    rng = np.random.default_rng(seed)
    with path.open("wb") as f:
        remaining = size
        while remaining:
            block = min(remaining, 4 << 20)
            f.write(rng.integers(0, 256, block, dtype=np.uint8).tobytes())
            remaining -= block
    return path


def tiny_gguf(
    path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> Path:
    """A small valid GGUF (F32/F16 tensors as given) written by gguf.GGUFWriter."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _string(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("<Q", len(raw)) + raw


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


NewTensor = tuple[int, tuple[int, ...], bytes]  # (type id, GGUF dims, data)


def rewrite_gguf(
    src: Path,
    dst: Path,
    *,
    extra_metadata: Mapping[str, str] | None = None,
    convert: Callable[[TensorSpan, np.ndarray], NewTensor | None] | None = None,
) -> Path:
    """Copy a GGUF, appending string metadata keys and letting `convert` replace any tensor's data
    (return None to keep it). Offsets and alignment are recomputed as gguf writers do."""
    layout: GGUFLayout | None = read_layout(src)
    if layout is None:
        raise ValueError(f"{src} is not a GGUF file this tool can rewrite")
    raw = np.memmap(src, dtype=np.uint8, mode="r")
    extra = dict(extra_metadata or {})
    tensors: list[tuple[TensorSpan, NewTensor | None]] = []
    for span in layout.tensors:
        data = raw[span.offset : span.offset + span.length]
        tensors.append((span, convert(span, data) if convert else None))
    head = bytearray(
        struct.pack("<IIQQ", gguf.GGUF_MAGIC, layout.version, len(tensors), layout.kv_count + len(extra))
    )
    head += raw[24 : layout.kv_end].tobytes()
    for key, value in extra.items():
        head += _string(key) + struct.pack("<I", gguf.GGUFValueType.STRING) + _string(value)
    offset = 0
    placements = []
    for span, new in tensors:
        type_id, dims, length = (
            (new[0], new[1], len(new[2])) if new else (span.type_id, span.shape, span.length)
        )
        head += _string(span.name) + struct.pack("<I", len(dims))
        head += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", type_id, offset)
        placements.append(offset)
        offset = _align(offset + length, layout.alignment)
    head += bytes(_align(len(head), layout.alignment) - len(head))
    with dst.open("wb") as f:
        f.write(head)
        data_start = len(head)
        for (span, new), place in zip(tensors, placements, strict=True):
            f.write(bytes(data_start + place - f.tell()))
            f.write(new[2] if new else raw[span.offset : span.offset + span.length].tobytes())
        f.write(bytes(_align(f.tell() - data_start, layout.alignment) + data_start - f.tell()))
        f.flush()
        os.fsync(f.fileno())
    return dst


def requantizer(
    names: Callable[[str], bool], target: gguf.GGMLQuantizationType
) -> Callable[[TensorSpan, np.ndarray], NewTensor | None]:
    """A `convert` for `rewrite_gguf`: tensors whose name matches become `target` (via float32)."""

    def convert(span: TensorSpan, data: np.ndarray) -> NewTensor | None:
        source = gguf.GGMLQuantizationType(span.type_id)
        if not names(span.name) or source == target:
            return None
        shape = tuple(reversed(span.shape))  # numpy order: the GGUF's first dim is the row length
        floats = dequantize(np.asarray(data).reshape(quant_shape_to_byte_shape(shape, source)), source)
        return int(target), span.shape, quantize(floats.astype(np.float32), target).tobytes()

    return convert
