# The llama.cpp tree vendored in the llama-cpp-python sdist: the same source scripts/build-llama.sh
# builds, so a Mac's Metal worker speaks the same RPC protocol as every other host.
{ fetchPypi }:
{
  version = "0.3.36";
  src = fetchPypi {
    pname = "llama_cpp_python";
    version = "0.3.36";
    hash = "sha256-gy2waZAH8b6Vp+Qe8S6IkmsCuoNkYeNqNjctsnYMGi4=";
  };
}
