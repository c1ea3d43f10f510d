#!/usr/bin/env bash
# Build llama.cpp's benchmark tools once, from the llama-cpp-python source package (it vendors
# llama.cpp and its convert_hf_to_gguf.py). Cached under $KLOTSKI_BENCH_CACHE; reruns are no-ops.
# Only llama-batched-bench and llama-bench; CPU only (no CUDA, no curl), native flags, 2 jobs, nice 19
# so a shared 2-core machine is disturbed less. Prints the llama.cpp source dir on success.
set -euo pipefail
cache=${KLOTSKI_BENCH_CACHE:-$HOME/.cache/klotski-bench}
pip=${PIP:-.venv/bin/pip}
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
src=$cache/llama-cpp-python-$version
build=$src/build
bins=(llama-batched-bench llama-bench)
mkdir -p "$cache/src"

if [ ! -d "$src/vendor/llama.cpp" ]; then
  sdist=$cache/src/llama_cpp_python-$version.tar.gz
  [ -f "$sdist" ] || "$pip" download -q --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$cache/src" >&2
  tmp=$(mktemp -d "$cache/unpack.XXXXXX")
  tar xzf "$sdist" -C "$tmp"
  mv "$tmp/llama_cpp_python-$version" "$src"
  rmdir "$tmp"
fi
llama=$src/vendor/llama.cpp

if ! [ -x "$build/bin/llama-batched-bench" ] || ! [ -x "$build/bin/llama-bench" ]; then
  nice -n 19 cmake -S "$llama" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
  nice -n 19 cmake --build "$build" -j 2 --target "${bins[@]}" >&2
fi
echo "$llama"
