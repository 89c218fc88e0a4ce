{ system, config ? { } }:
let
  # A derivation that depends on everything it was given, so evaluating its path evaluates (and
  # checks the existence of) every package the recipe names.
  build = name: attrs: builtins.derivation {
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" "echo stub > $out" ];
    inputs = builtins.concatLists (map (key: attrs.${key} or [ ])
      [ "nativeBuildInputs" "buildInputs" "dependencies" "build-system" "paths" "packages" "patches" ]);
    flags = attrs.cmakeFlags or [ ];
  };
  drv = name: build name { };
  named = names: builtins.listToAttrs (map (n: { name = n; value = drv n; }) names);
  lib = {
    genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
    optionals = cond: list: if cond then list else [ ];
    licenses.mit = { };
  };
  callPackage = f: args:
    let
      fn = if builtins.isFunction f then f else import f;
      result = fn (builtins.intersectAttrs (builtins.functionArgs fn) pkgs // args);
    in
    result // { override = more: callPackage f (args // more); };
  pkgs = named [ "cmake" "ninja" "python3" "ruff" "shellcheck" "hadolint" "kubernetes-helm" ] // {
    inherit lib callPackage;
    stdenv = {
      mkDerivation = attrs: build "${attrs.pname}-${attrs.version}" attrs;
      isDarwin = false;
      hostPlatform = { inherit system; isx86_64 = true; extensions.sharedLibrary = ".so"; };
    };
    fetchPypi = attrs: drv "${attrs.pname}-${attrs.version}.tar.gz";
    writeShellApplication = attrs: build attrs.name { };
    symlinkJoin = attrs: build attrs.name attrs;
    mkShell = attrs: build "shell" attrs;
    cudaPackages = named [ "cuda_nvcc" "cuda_cudart" "libcublas" ];
    rocmPackages = named [ "clr" "hipblas" "rocblas" ];
    python3Packages = named [
      "numpy" "typing-extensions" "diskcache" "jinja2" "scikit-build-core" "setuptools" "starlette"
      "uvicorn" "httpx" "pyyaml" "jsonschema" "docker" "kubernetes-asyncio" "prometheus-client"
      "sse-starlette" "rich" "watchfiles" "gguf"
    ] // {
      buildPythonPackage = attrs: build "${attrs.pname}-${attrs.version}" attrs;
      buildPythonApplication = attrs: build "${attrs.pname}-${attrs.version}" attrs // { inherit (attrs) version; };
    };
  };
in
pkgs
