"""Where a GGUF file keeps its header and each tensor's bytes, so pieces can be keyed by content.

The `gguf` package supplies the format's constants (magic, value types, quantisation block sizes).
Its `GGUFReader` builds numpy views of every metadata value, which takes 2-20 s on the tokenizer
arrays of a small model, so the header walk here skips values instead of decoding them: ~0.1 s.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from tightwad.errors import TightwadError

_SCALAR_SIZES = {
    gguf.GGUFValueType.UINT8: 1,
    gguf.GGUFValueType.INT8: 1,
    gguf.GGUFValueType.BOOL: 1,
    gguf.GGUFValueType.UINT16: 2,
    gguf.GGUFValueType.INT16: 2,
    gguf.GGUFValueType.UINT32: 4,
    gguf.GGUFValueType.INT32: 4,
    gguf.GGUFValueType.FLOAT32: 4,
    gguf.GGUFValueType.UINT64: 8,
    gguf.GGUFValueType.INT64: 8,
    gguf.GGUFValueType.FLOAT64: 8,
}


class GGUFLayoutError(TightwadError, ValueError):  # ValueError: what a parse failure is
    """The bytes are not a GGUF file this parser understands (the file is then treated as opaque)."""


@dataclass(frozen=True)
class TensorSpan:
    """One tensor's data: `offset` is absolute in the file."""

    name: str
    offset: int
    length: int
    type_id: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class GGUFLayout:
    version: int
    alignment: int
    kv_count: int
    kv_end: int  # first byte after the last metadata key/value (where tensor infos start)
    infos_end: int  # first byte after the last tensor info (padding to `data_offset` follows)
    data_offset: int
    tensors: tuple[TensorSpan, ...]  # in file order


class _Cursor:
    def __init__(self, view: memoryview | bytes) -> None:
        self.view = view
        self.pos = 0

    def take(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.view):
            raise GGUFLayoutError("the header ends early; the file is truncated")
        (value,) = struct.unpack_from(fmt, self.view, self.pos)
        self.pos += size
        return value

    def skip(self, size: int) -> None:
        if size < 0 or self.pos + size > len(self.view):
            raise GGUFLayoutError("a header value runs past the end of the file")
        self.pos += size

    def string(self) -> bytes:
        length = self.take("<Q")
        start = self.pos
        self.skip(length)
        return bytes(self.view[start : self.pos])

    def skip_value(self, value_type: int) -> None:
        if value_type == gguf.GGUFValueType.STRING:
            self.skip(self.take("<Q"))
        elif value_type == gguf.GGUFValueType.ARRAY:
            item_type, count = self.take("<I"), self.take("<Q")
            if item_type in _SCALAR_SIZES:
                self.skip(count * _SCALAR_SIZES[gguf.GGUFValueType(item_type)])
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        elif value_type in _SCALAR_SIZES:
            self.skip(_SCALAR_SIZES[gguf.GGUFValueType(value_type)])
        else:
            raise GGUFLayoutError(f"unknown metadata value type {value_type}")


def tensor_bytes(type_id: int, shape: tuple[int, ...]) -> int:
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise GGUFLayoutError(f"unknown tensor type {type_id}") from None
    elements = 1
    for dim in shape:
        elements *= dim
    if elements % block:
        raise GGUFLayoutError(f"{elements} elements is not a whole number of {block}-element blocks")
    return elements // block * type_size


def parse_layout(view: memoryview | bytes, file_size: int | None = None) -> GGUFLayout:
    """The layout of the GGUF whose first bytes (at least the whole header) are `view`."""
    cur = _Cursor(view)
    if len(view) < 8 or cur.take("<I") != gguf.GGUF_MAGIC:
        raise GGUFLayoutError("no GGUF magic at the start")
    version = cur.take("<I")
    if version not in (2, 3):
        raise GGUFLayoutError(f"GGUF version {version} (big-endian or unknown) is not supported")
    tensor_count, kv_count = cur.take("<Q"), cur.take("<Q")
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        key = cur.string()
        value_type = cur.take("<I")
        if key == gguf.Keys.General.ALIGNMENT.encode() and value_type == gguf.GGUFValueType.UINT32:
            alignment = cur.take("<I")
        else:
            cur.skip_value(value_type)
    kv_end = cur.pos
    infos = []
    for _ in range(tensor_count):
        name = cur.string().decode("utf-8", errors="replace")
        dims = cur.take("<I")
        shape = tuple(cur.take("<Q") for _ in range(dims))
        type_id, offset = cur.take("<I"), cur.take("<Q")
        infos.append((name, shape, type_id, offset))
    if alignment <= 0:
        raise GGUFLayoutError(f"alignment {alignment} is not positive")
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = tuple(
        TensorSpan(name, data_offset + offset, tensor_bytes(type_id, shape), type_id, shape)
        for name, shape, type_id, offset in infos
    )
    end = file_size if file_size is not None else len(view)
    for tensor in tensors:
        if tensor.offset + tensor.length > end:
            raise GGUFLayoutError(f"tensor {tensor.name} runs past the end of the file")
    return GGUFLayout(version, alignment, kv_count, kv_end, cur.pos, data_offset, tensors)


def read_layout(path: Path) -> GGUFLayout | None:
    """The layout of the GGUF at `path`, or None when it is not one (such files still travel, by piece)."""
    with path.open("rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return parse_layout(view, size)
            except GGUFLayoutError:
                return None
            finally:
                view.release()
