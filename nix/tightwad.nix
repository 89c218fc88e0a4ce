# Tightwad itself, with llama-cpp-python built as bindings only (no llama.cpp of its own) and
# pointed at the worker's libllama: one llama.cpp build for everything.
{ python3Packages, callPackage, writeShellApplication, symlinkJoin, llama, src }:
let
  py = python3Packages;
  source = callPackage ./llama-source.nix { };
  llama-cpp-bindings = py.buildPythonPackage {
    pname = "llama-cpp-python";
    inherit (source) version src;
    pyproject = true;
    build-system = [ py.scikit-build-core ];
    dontUseCmakeConfigure = true;
    env.CMAKE_ARGS = "-DLLAMA_BUILD=OFF";
    dependencies = [ py.numpy py.typing-extensions py.diskcache py.jinja2 ];
    doCheck = false;
  };
  tightwad = py.buildPythonApplication {
    pname = "tightwad";
    version = "0.1.0";
    inherit src;
    pyproject = true;
    build-system = [ py.setuptools ];
    dependencies = [
      py.starlette py.uvicorn py.httpx py.pyyaml py.jsonschema py.docker py.kubernetes-asyncio
      py.prometheus-client py.sse-starlette py.rich py.watchfiles py.gguf py.numpy py.jinja2
      llama-cpp-bindings
    ];
    makeWrapperArgs = [
      "--set-default" "TIGHTWAD_LLAMA_PREFIX" "${llama}"
      "--set-default" "LLAMA_CPP_LIB_PATH" "${llama}/lib"
      "--prefix" "PATH" ":" "${llama}/bin"
    ];
    doCheck = false;
    meta.mainProgram = "tightwad";
  };
  entry = name: text: writeShellApplication { inherit name text; };
in
symlinkJoin {
  name = "tightwad-${tightwad.version}";
  paths = [
    tightwad
    # This machine's part of the manifest, as a native agent. TIGHTWAD_MANIFEST (file or URL)
    # and TIGHTWAD_HOST (default: the short host name) may stand in for the flags.
    (entry "tightwad-worker" ''
      args=(--host "''${TIGHTWAD_HOST:-$(hostname -s)}")
      if [ -n "''${TIGHTWAD_MANIFEST:-}" ]; then args+=(--manifest "$TIGHTWAD_MANIFEST"); fi
      exec ${tightwad}/bin/tightwad agent "''${args[@]}" "$@"
    '')
    (entry "tightwad-proxy" ''exec ${tightwad}/bin/tightwad proxy start "$@"'')
    (entry "tightwad-operator" ''exec ${tightwad}/bin/tightwad operator "$@"'')
  ];
  meta.mainProgram = "tightwad";
}
