"""A thin, typed adapter over libllama (llama-cpp-python's low-level ctypes API) and libggml.

Everything that touches ctypes lives here, so the engine above it deals in Python lists and numpy
rows. Facts this layer encodes (each learned the hard way):

- llama-cpp-python must load the ONE pinned build: `tightwad.toolchain.activate()` sets
  LLAMA_CPP_LIB_PATH before the first `import llama_cpp`. Its `_ggml` module ignores that variable,
  so libggml is opened here from the same folder.
- `Llama(rpc_servers=...)` is silently ignored; RPC devices come from the ggml RPC registry
  (`ggml_backend_rpc_add_server`) and go into `model_params.devices` as a NULL-terminated array.
- A batch larger than n_batch aborts the whole process (GGML_ASSERT), so sizes are checked first.
- `llama_get_logits_ith` takes the batch index and its buffer lives only until the next decode.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tightwad import rpcprobe, toolchain
from tightwad.errors import TightwadError

_lock = threading.Lock()
_llama: Any = None
_ggml: ctypes.CDLL | None = None


class LlamaError(TightwadError):
    """libllama refused an operation; the message says which and why."""


class KvCacheFull(LlamaError):
    """llama_decode found no room in the KV cache for the batch (return code 1)."""


def llama() -> Any:
    """The `llama_cpp.llama_cpp` module, bound to the pinned build; initialised once."""
    global _llama
    with _lock:
        if _llama is None:
            toolchain.activate()
            import llama_cpp.llama_cpp as bindings

            bindings.llama_log_set(_log_callback(bindings), ctypes.c_void_p(0))
            bindings.llama_backend_init()
            _llama = bindings
    return _llama


_LOG_LEVEL_WARN, _LOG_LEVEL_CONT = 3, 5
_log_state = {"level": 2, "quiet": True}
_callbacks: list[Any] = []  # keep the ctypes callback alive for the life of the process


def _log_callback(bindings: Any) -> Any:
    """Forward llama.cpp's warnings and errors to stderr; drop its chatty info lines."""
    import sys

    @bindings.llama_log_callback
    def forward(level: int, text: bytes, _user: Any) -> None:
        level = _log_state["level"] if level == _LOG_LEVEL_CONT else level
        _log_state["level"] = level
        if level >= _LOG_LEVEL_WARN or not _log_state["quiet"]:
            sys.stderr.write(text.decode("utf-8", "replace"))

    _callbacks.append(forward)
    return forward


def set_verbose(verbose: bool) -> None:
    _log_state["quiet"] = not verbose


def set_exact(on: bool) -> None:
    """Exact mode for the CPU backends this process creates from now on (each Context makes one).

    The pinned build patches ggml so its CPU kernels compute every output element in the same order
    whatever the number of tokens in a batch (scripts/llama-exact.patch): a token's
    logits are then bit-identical whether it is decoded alone or inside a verify block. ggml reads
    GGML_CPU_EXACT when it creates a CPU backend; unset means on, but `tightwad engine` always says
    (its `--exact` defaults to off: strict mode costs prefill speed). Warns when the build lacks it.
    """
    import os
    import sys

    os.environ["GGML_CPU_EXACT"] = "1" if on else "0"
    if on and not toolchain.find().exact:
        sys.stderr.write(
            "warning: this llama.cpp build lacks the exact-mode patch: a token scored inside a "
            "verify block may differ in its last bits from the same token decoded alone\n"
        )


def ggml() -> ctypes.CDLL:
    """libggml from the folder libllama came from, with the few signatures we call declared."""
    global _ggml
    bindings = llama()
    with _lock:
        if _ggml is None:
            lib = ctypes.CDLL(str(Path(bindings._base_path) / "libggml.so"))
            vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
            signatures: dict[str, tuple[list[Any], Any]] = {
                "ggml_backend_reg_by_name": ([cp], vp),
                "ggml_backend_reg_get_proc_address": ([vp, cp], vp),
                "ggml_backend_reg_dev_count": ([vp], sz),
                "ggml_backend_reg_dev_get": ([vp, sz], vp),
                "ggml_backend_dev_name": ([vp], cp),
                "ggml_backend_dev_description": ([vp], cp),
                "ggml_backend_dev_memory": ([vp, ctypes.POINTER(sz), ctypes.POINTER(sz)], None),
                "ggml_backend_dev_count": ([], sz),
                "ggml_backend_dev_get": ([sz], vp),
                "ggml_backend_dev_type": ([vp], ctypes.c_int),
            }
            for name, (args, result) in signatures.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, result
            _ggml = lib
    return _ggml


@dataclass(frozen=True)
class Device:
    """One ggml backend device: an RPC worker's GPU/CPU as seen from the coordinator."""

    endpoint: str
    name: str
    description: str
    free_bytes: int
    total_bytes: int
    handle: int  # ggml_backend_dev_t


def check_workers(endpoints: Sequence[str]) -> None:
    """Refuse, with the endpoint named, a worker that is down or runs another llama.cpp build.

    This must happen before ggml sees the endpoint: libggml aborts the process on a failed connect.
    """
    ours = rpcprobe.protocol_version(toolchain.find().rpc_header)
    for endpoint in endpoints:
        try:
            theirs = rpcprobe.hello(endpoint)
        except rpcprobe.WorkerUnreachable as exc:
            raise LlamaError(f"{exc}; check that `ggml-rpc-server` is listening there") from exc
        if not rpcprobe.compatible(ours, theirs):
            raise LlamaError(
                f"rpc worker {endpoint} speaks RPC protocol {'.'.join(map(str, theirs))} but this "
                f"coordinator speaks {'.'.join(map(str, ours))}: run the same llama.cpp build everywhere"
            )


def rpc_devices(endpoints: Sequence[str]) -> list[Device]:
    """Connect to each `host:port` rpc worker (after `check_workers`) and return its devices."""
    check_workers(endpoints)
    bindings, lib = llama(), ggml()
    if not bindings.llama_supports_rpc():
        raise LlamaError("this libllama was built without GGML_RPC; rebuild with `tightwad toolchain build`")
    registry = lib.ggml_backend_reg_by_name(b"RPC")
    add_server_ptr = lib.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_rpc_add_server")
    if not registry or not add_server_ptr:
        raise LlamaError("the RPC backend is missing from libggml")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(add_server_ptr)
    devices: list[Device] = []
    for endpoint in endpoints:
        reg = add_server(endpoint.encode())
        count = lib.ggml_backend_reg_dev_count(reg) if reg else 0
        if not count:
            raise LlamaError(f"rpc worker {endpoint} reports no devices")
        for index in range(count):
            devices.append(_describe(endpoint, lib.ggml_backend_reg_dev_get(reg, index)))
    return devices


def _describe(endpoint: str, dev: int) -> Device:
    lib = ggml()
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return Device(
        endpoint=endpoint,
        name=lib.ggml_backend_dev_name(dev).decode(),
        description=lib.ggml_backend_dev_description(dev).decode(),
        free_bytes=free.value,
        total_bytes=total.value,
        handle=dev,
    )


_DEVICE_TYPE_GPU, _DEVICE_TYPE_IGPU = 1, 2


def local_gpu_devices() -> list[Device]:
    """This host's own GPUs (none on a CPU-only build); integrated GPUs only when there is no other.

    They join the rpc workers' devices the way llama-server's default device list does.
    """
    lib = ggml()
    llama()
    by_type: dict[int, list[Device]] = {_DEVICE_TYPE_GPU: [], _DEVICE_TYPE_IGPU: []}
    for index in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(index)
        kind = lib.ggml_backend_dev_type(dev)
        name = lib.ggml_backend_dev_name(dev).decode()
        if kind in by_type and not name.startswith("RPC"):
            by_type[kind].append(_describe("local", dev))
    return by_type[_DEVICE_TYPE_GPU] or by_type[_DEVICE_TYPE_IGPU]


# Aborts ----------------------------------------------------------------------------------------
# libggml calls abort() on a fatal error, e.g. "Remote RPC server crashed or returned malformed
# response" when an rpc worker goes away during any operation that touches its memory. Before it
# does, it calls the callback set with ggml_set_abort_callback, on the thread that failed (for RPC
# that is the worker's dispatcher thread; the thread that called llama_decode then waits for it
# forever). A trap may report the failure and then park the failing thread for good, so the process
# stays up to answer "503: the pool lost a worker" instead of vanishing.

_abort_callback_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


def install_abort_trap(handler: Callable[[str], bool]) -> None:
    """Call `handler(message)` on a fatal libggml error. If it returns True the failing thread is
    parked forever (the process lives on, libllama is unusable from then on); if it returns False
    the process aborts as libggml intended."""
    bindings = llama()
    base = ctypes.CDLL(str(Path(bindings._base_path) / "libggml-base.so"))
    base.ggml_set_abort_callback.argtypes = [_abort_callback_type]
    base.ggml_set_abort_callback.restype = ctypes.c_void_p

    @_abort_callback_type
    def on_abort(message: bytes) -> None:
        text = message.decode("utf-8", "replace").strip()
        try:
            park = handler(text)
        except Exception:  # a trap that fails must not turn an abort into a hang
            park = False
        if park:
            threading.Event().wait()
        import sys

        sys.stderr.write(f"{text}\n")
        sys.stderr.flush()

    _callbacks.append(on_abort)
    base.ggml_set_abort_callback(on_abort)


def builtin_chat_template(name: str, messages: Sequence[tuple[str, str]], add_assistant: bool) -> str | None:
    """Render (role, content) messages with one of llama.cpp's built-in templates (e.g. "gemma",
    "chatml"), or None when llama.cpp does not know `name`."""
    bindings = llama()
    encoded = [(role.encode(), content.encode()) for role, content in messages]
    chat = (bindings.llama_chat_message * max(1, len(encoded)))()
    for i, (role, content) in enumerate(encoded):
        chat[i].role = role
        chat[i].content = content
    size = sum(len(r) + len(c) for r, c in encoded) * 2 + 256
    buf = ctypes.create_string_buffer(size)
    n = bindings.llama_chat_apply_template(name.encode(), chat, len(encoded), add_assistant, buf, size)
    if n < 0:
        return None
    if n > size:
        buf = ctypes.create_string_buffer(n + 1)
        n = bindings.llama_chat_apply_template(name.encode(), chat, len(encoded), add_assistant, buf, n + 1)
    return buf.raw[:n].decode("utf-8", "replace")


class Model:
    """A loaded GGUF model (weights spread over `devices`, or local CPU when there are none)."""

    def __init__(
        self,
        path: str | Path,
        devices: Sequence[Device] = (),
        tensor_split: Sequence[float] | None = None,
        n_gpu_layers: int = 999,
        repack: bool = True,
    ) -> None:
        bindings = llama()
        params = bindings.llama_model_default_params()
        # Repacked ("extra buffer type") weights on this host's CPU: faster kernels, same bits in
        # exact mode (the patched build runs them one row at a time there).
        params.use_extra_bufts = repack
        self._keepalive: list[Any] = []
        if devices:
            handles = (ctypes.c_void_p * (len(devices) + 1))(*[d.handle for d in devices], None)
            self._keepalive.append(handles)
            params.devices = ctypes.cast(handles, ctypes.c_void_p)
            params.n_gpu_layers = n_gpu_layers
            if tensor_split:
                split = (ctypes.c_float * len(tensor_split))(*tensor_split)
                self._keepalive.append(split)
                params.tensor_split = split
        else:
            params.n_gpu_layers = 0
        self.path = Path(path)
        if not self.path.is_file():
            raise LlamaError(f"model file {self.path} does not exist")
        self.ptr = bindings.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise LlamaError(f"libllama could not load {self.path} (see the log above for why)")
        self.vocab = bindings.llama_model_get_vocab(self.ptr)
        self.n_vocab: int = bindings.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train: int = bindings.llama_model_n_ctx_train(self.ptr)
        self.size_bytes: int = bindings.llama_model_size(self.ptr)

    def close(self) -> None:
        if self.ptr:
            llama().llama_model_free(self.ptr)
            self.ptr = None

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama().llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama().llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        raw = text.encode()
        capacity = len(raw) + 16
        buf = (llama().llama_token * capacity)()
        n = llama().llama_tokenize(self.vocab, raw, len(raw), buf, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            buf = (llama().llama_token * capacity)()
            n = llama().llama_tokenize(self.vocab, raw, len(raw), buf, capacity, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The raw bytes of one token: may be part of a multibyte character, so bytes not str."""
        buf = ctypes.create_string_buffer(128)
        n = llama().llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama().llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", "replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama().llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int) -> str:
        """The vocabulary's text for a token (e.g. "<|im_end|>"), as templates spell it."""
        return bytes(llama().llama_vocab_get_text(self.vocab, token) or b"").decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        """The Jinja chat template stored in the GGUF (`tokenizer.chat_template`), if any."""
        raw = llama().llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8", "replace") if raw else None

    @property
    def adds_bos(self) -> bool:
        return bool(llama().llama_vocab_get_add_bos(self.vocab))

    @property
    def n_params(self) -> int:
        return int(llama().llama_model_n_params(self.ptr))

    @property
    def bos(self) -> int:
        return int(llama().llama_vocab_bos(self.vocab))

    @property
    def eos(self) -> int:
        return int(llama().llama_vocab_eos(self.vocab))


class Batch:
    """A reusable llama_batch with a bounds check (overflowing one aborts the process)."""

    def __init__(self, capacity: int, n_seq_max: int = 1) -> None:
        self.capacity = capacity
        self.raw = llama().llama_batch_init(capacity, 0, n_seq_max)
        self.n_seq_max = n_seq_max

    def clear(self) -> None:
        self.raw.n_tokens = 0

    def __len__(self) -> int:
        return int(self.raw.n_tokens)

    def add(self, token: int, pos: int, seq_ids: Sequence[int], logits: bool) -> int:
        """Append one token; returns its index in the batch (the index logits are read by)."""
        i = int(self.raw.n_tokens)
        if i >= self.capacity:
            raise LlamaError(f"batch is full ({self.capacity} tokens)")
        if len(seq_ids) > self.n_seq_max:
            raise LlamaError(f"a token may belong to at most {self.n_seq_max} sequences")
        self.raw.token[i] = token
        self.raw.pos[i] = pos
        self.raw.n_seq_id[i] = len(seq_ids)
        for j, seq in enumerate(seq_ids):
            self.raw.seq_id[i][j] = seq
        self.raw.logits[i] = 1 if logits else 0
        self.raw.n_tokens = i + 1
        return i

    def close(self) -> None:
        if self.raw is not None:
            llama().llama_batch_free(self.raw)
            self.raw = None


FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}


class Context:
    """A llama_context: the KV cache (one sequence per conversation) and the decode call.

    `flash_attn` and `kv_type` default to llama.cpp's (and llama-server's) defaults. In exact mode
    (`set_exact`, the default of the pinned build) a position's logits are bit-identical whether it
    is evaluated alone or inside a block, with any of these settings (tests/engine/test_invariance.py,
    bench/invariance.py). With stock kernels (GGML_CPU_EXACT=0) they are not: the largest difference
    reaches ~1 logit on a Q4_K_M model, and greedy speculation then breaks near-ties differently.
    """

    def __init__(
        self,
        model: Model,
        n_ctx: int,
        n_seq_max: int = 1,
        n_batch: int = 512,
        n_threads: int = 1,
        flash_attn: str = "auto",
        kv_type: str = "f16",
    ) -> None:
        bindings = llama()
        if flash_attn not in FLASH_ATTN or kv_type not in KV_TYPES:
            raise LlamaError(f"flash_attn must be one of {list(FLASH_ATTN)}, kv_type one of {list(KV_TYPES)}")
        params = bindings.llama_context_default_params()
        params.flash_attn_type = FLASH_ATTN[flash_attn]
        params.type_k = KV_TYPES[kv_type]
        params.type_v = KV_TYPES[kv_type]
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        # One KV pool shared by all sequences: without it n_ctx is split per sequence and several
        # sequences sharing a prefix in one batch fail ("coupled sequences").
        params.kv_unified = True
        params.no_perf = True
        self.model = model
        self.ptr = bindings.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise LlamaError(f"could not create a context of {n_ctx} tokens (out of memory?)")
        self.n_ctx: int = bindings.llama_n_ctx(self.ptr)
        self.n_batch: int = bindings.llama_n_batch(self.ptr)
        self.n_seq_max = n_seq_max
        self.memory = bindings.llama_get_memory(self.ptr)

    def close(self) -> None:
        if self.ptr:
            llama().llama_free(self.ptr)
            self.ptr = None

    def decode(self, batch: Batch) -> None:
        if len(batch) > self.n_batch:
            raise LlamaError(f"batch of {len(batch)} tokens exceeds n_batch={self.n_batch}")
        rc = llama().llama_decode(self.ptr, batch.raw)
        if rc == 1:
            raise KvCacheFull(f"no room in the KV cache ({self.n_ctx} cells) for {len(batch)} more tokens")
        if rc != 0:
            raise LlamaError(f"llama_decode failed with code {rc} ({len(batch)} tokens)")

    def synchronize(self) -> None:
        """Wait for the backends (RPC/GPU decode returns before the work is done)."""
        llama().llama_synchronize(self.ptr)

    def logits(self, batch_index: int) -> np.ndarray:
        """A COPY of the logits row for a batch entry that was flagged for logits."""
        ptr = llama().llama_get_logits_ith(self.ptr, batch_index)
        if not ptr:
            raise LlamaError(f"no logits for batch index {batch_index} (was it flagged?)")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def logits_view(self, batch_index: int) -> np.ndarray:
        """The logits row for a flagged batch entry WITHOUT a copy: valid only until the next decode."""
        ptr = llama().llama_get_logits_ith(self.ptr, batch_index)
        if not ptr:
            raise LlamaError(f"no logits for batch index {batch_index} (was it flagged?)")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def argmax(self, batch_index: int) -> int:
        return int(np.argmax(self.logits_view(batch_index)))

    # KV sequence management ------------------------------------------------------------------
    def clear(self) -> None:
        llama().llama_memory_clear(self.memory, True)

    def remove(self, seq: int, start: int = 0, end: int = -1) -> None:
        """Drop positions [start, end) of a sequence (end -1: to the end)."""
        if not llama().llama_memory_seq_rm(self.memory, seq, start, end):
            raise LlamaError(f"could not remove positions {start}..{end} of sequence {seq}")

    def copy(self, src: int, dst: int, start: int = -1, end: int = -1) -> None:
        llama().llama_memory_seq_cp(self.memory, src, dst, start, end)

    def last_position(self, seq: int) -> int:
        """The highest position held for a sequence, or -1 when it is empty."""
        return int(llama().llama_memory_seq_pos_max(self.memory, seq))

    def prefill(self, batch: Batch, tokens: Sequence[int], start: int, seq: int = 0) -> int:
        """Evaluate tokens at positions start.. in n_batch chunks; returns the batch index of the
        last token's logits (valid until the next decode)."""
        if not tokens:
            raise LlamaError("nothing to evaluate")
        last_index = 0
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset : offset + self.n_batch]
            batch.clear()
            for j, token in enumerate(chunk):
                is_last = offset + j == len(tokens) - 1
                index = batch.add(token, start + offset + j, (seq,), is_last)
                if is_last:
                    last_index = index
            self.decode(batch)
        return last_index


def greedy_generate(
    ctx: Context, prompt: Sequence[int], n_tokens: int, stop_at_eog: bool = True
) -> list[int]:
    """Plain greedy decoding in sequence 0, one token per decode: the reference everything is
    compared against."""
    ctx.clear()
    batch = Batch(max(ctx.n_batch, 1))
    try:
        index = ctx.prefill(batch, prompt, 0)
        out: list[int] = []
        pos = len(prompt)
        while len(out) < n_tokens:
            token = ctx.argmax(index)
            out.append(token)
            if stop_at_eog and ctx.model.is_end_of_generation(token):
                break
            batch.clear()
            index = batch.add(token, pos, (0,), True)
            ctx.decode(batch)
            pos += 1
        return out
    finally:
        batch.close()
