# llama.cpp with RPC on: libllama/libggml, ggml-rpc-server and llama-server, laid out like the
# prefix scripts/build-llama.sh makes (bin/, lib/, include/, .complete) so tightwad finds it through
# TIGHTWAD_LLAMA_PREFIX.
{ lib, stdenv, callPackage, cmake, ninja
, cudaSupport ? false, cudaPackages ? { }
, rocmSupport ? false, rocmPackages ? { }
}:
let
  source = callPackage ./llama-source.nix { };
  onOff = flag: if flag then "ON" else "OFF";
in
stdenv.mkDerivation {
  pname = "tightwad-worker";
  inherit (source) version src;
  sourceRoot = "llama_cpp_python-${source.version}/vendor/llama.cpp";
  # Exact mode, as scripts/build-llama.sh builds it: batch-invariant CPU kernels unless
  # GGML_CPU_EXACT=0, so a manifest's `exact: strict` means the same on every host.
  patches = [ ../scripts/llama-exact.patch ];

  nativeBuildInputs = [ cmake ninja ]
    ++ lib.optionals cudaSupport [ cudaPackages.cuda_nvcc ];
  buildInputs = lib.optionals cudaSupport [ cudaPackages.cuda_cudart cudaPackages.libcublas ]
    ++ lib.optionals rocmSupport [ rocmPackages.clr rocmPackages.hipblas rocmPackages.rocblas ];

  cmakeFlags = [
    "-DBUILD_SHARED_LIBS=ON"
    "-DGGML_RPC=ON"
    "-DGGML_NATIVE=OFF"
    "-DLLAMA_USE_PREBUILT_UI=OFF"
    "-DLLAMA_BUILD_UI=OFF"
    "-DLLAMA_BUILD_TESTS=OFF"
    "-DLLAMA_BUILD_EXAMPLES=OFF"
    "-DLLAMA_BUILD_APP=OFF"
    "-DLLAMA_BUILD_SERVER=ON"
    "-DLLAMA_OPENSSL=OFF"
    "-DGGML_METAL=${onOff stdenv.isDarwin}"
    "-DGGML_CUDA=${onOff cudaSupport}"
    "-DGGML_HIP=${onOff rocmSupport}"
  ] ++ lib.optionals stdenv.hostPlatform.isx86_64 [
    "-DGGML_AVX=ON" "-DGGML_AVX2=ON" "-DGGML_FMA=ON" "-DGGML_F16C=ON"
  ];

  ninjaFlags = [ "llama" "ggml-rpc-server" "llama-server" ];

  installPhase = ''
    runHook preInstall
    mkdir -p $out/bin $out/lib $out/include
    cp -a bin/*${stdenv.hostPlatform.extensions.sharedLibrary}* $out/lib/
    cp -a bin/ggml-rpc-server bin/llama-server $out/bin/
    cp -a ../include/llama.h ../ggml/include/ggml-rpc.h $out/include/
    echo "layout=2" > $out/.complete
    runHook postInstall
  '';

  meta = {
    description = "The pinned llama.cpp build of a Tightwad worker (RPC on)";
    license = lib.licenses.mit;
    mainProgram = "ggml-rpc-server";
  };
}
