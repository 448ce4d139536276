#!/usr/bin/env bash
# Chat with the default model: idempotent set-up (scripts/setup.sh), then the Hydra chat CLI.
# Arguments go to the CLI, e.g. `scripts/run_chat.sh --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m hydra.inference.cli "$@"
