#!/usr/bin/env bash
# Builds llama.cpp's HTTP server, llama-server, for bench/serve.py's comparison and tests/test_bench_serve.py: from the
# llama.cpp that llama-cpp-python 0.3.36's sdist vendors (the source setup.sh's reference comes from), with native CPU
# flags (llama.cpp at its fastest on this machine), into $REALM_LLAMA_SERVER_DIR, else
# ~/.cache/realm/llama-server-0.3.36. A second run finds the binary and builds nothing. Prints the binary's path last.
# Needs cmake and a C++ compiler; the sdist comes from PyPI (or pip's cache).
set -euo pipefail
PY=${PYTHON:-python3}
VERSION=0.3.36
DIR=${REALM_LLAMA_SERVER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/realm/llama-server-$VERSION}
BIN=$DIR/build/bin/llama-server
if [ ! -x "$BIN" ]; then
    for tool in cmake c++; do
        command -v "$tool" >/dev/null || { echo "build_llama_server: $tool not found" >&2; exit 1; }
    done
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$work"
    tar -xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
    mkdir -p "$DIR"
    rm -rf "$DIR/src" && mv "$work/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DIR/src"
    cmake -S "$DIR/src" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF >"$DIR/configure.log" 2>&1 || { tail -20 "$DIR/configure.log" >&2; exit 1; }
    cmake --build "$DIR/build" --target llama-server -j "$(nproc)" >"$DIR/build.log" 2>&1 ||
        { tail -20 "$DIR/build.log" >&2; exit 1; }
fi
echo "$BIN"
