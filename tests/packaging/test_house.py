"""The house: one import root, the pinned toolchain found where the build script put it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import ROOT

from tightwad import toolchain
from tightwad.cli import main


def test_components_import_under_one_root() -> None:
    import tightwad.engine
    import tightwad.operator
    import tightwad.proxy
    import tightwad.swarm

    assert Path(tightwad.engine.__file__).parent == ROOT / "engine"
    assert list(tightwad.operator.__path__) == [str(ROOT / "operator")]
    assert tightwad.proxy.__name__ == "tightwad.proxy" and tightwad.swarm.__name__ == "tightwad.swarm"


def test_bare_operator_is_still_the_standard_library_from_the_repo_root() -> None:
    # `python -m` puts the working directory first on sys.path: an operator/__init__.py there would
    # shadow the standard library for every such command.
    out = subprocess.run(
        [sys.executable, "-m", "json.tool", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    probe = "import operator, tightwad.operator; print(operator.__file__); print(operator.eq(1, 1))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path, eq = out.stdout.split()
    assert not path.startswith(str(ROOT)) and eq == "True"


def test_python_and_build_script_agree_on_the_cache_key() -> None:
    printed = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-llama.sh"), "--print-prefix"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert printed == str(toolchain.expected_prefix())


def test_extra_cmake_flags_change_the_key(monkeypatch) -> None:
    plain = toolchain.build_key()
    monkeypatch.setenv("TIGHTWAD_LLAMA_CMAKE_ARGS", "-DGGML_CUDA=ON")
    assert toolchain.build_key() != plain


def test_toolchain_is_built_with_rpc_and_both_servers(toolchain: toolchain.Toolchain) -> None:
    assert toolchain.rpc_server.is_file() and toolchain.llama_server.is_file()
    assert (toolchain.lib_dir / "libllama.so").is_file()
    info = (toolchain.prefix / "BUILD-INFO").read_text()
    assert "-DGGML_RPC=ON" in info and "-DGGML_NATIVE=OFF" in info


def test_missing_toolchain_is_one_clear_line(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("TIGHTWAD_LLAMA_PREFIX", str(tmp_path / "nowhere"))
    assert main(["toolchain", "path"]) == 1
    err = capsys.readouterr().err
    assert "run `tightwad toolchain build`" in err and "Traceback" not in err


def test_the_readme_manifest_example_is_valid(tmp_path) -> None:
    import re

    from tightwad.manifest import load_manifest

    example = re.search(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert example, "README.md should show a manifest"
    path = tmp_path / "readme.yaml"
    path.write_text(example.group(1))
    assert load_manifest(path).target.model == "smollm2-f32"


def test_the_manifest_reference_is_generated_from_the_schema() -> None:
    from tightwad import schemadoc

    assert schemadoc.main(["--check"]) == 0, "run `python -m tightwad.schemadoc`"
    text = (ROOT / "docs" / "manifest.md").read_text()
    assert "| `spec.hosts[].gpus[].backend` | `cuda` \\| `rocm` \\| `metal` \\| `cpu` |" in text
