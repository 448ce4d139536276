#!/usr/bin/env bash
# Rebuild the default Hydra++ heads: self-distill -> split -> feature cache -> train -> draft vocabulary + tree
# -> MT-Bench speed and fp32 losslessness. Every stage skips what is done and resumes what was killed; the same
# command runs on CPU (over several sessions) and on one GPU (--device cuda). Stages: hydra/train/pipeline.py.
#
#   scripts/train_default_heads.sh [--device cuda] [--data FILE] [--workdir DIR] [--dry-run] ...
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PY:-.venv/bin/python}" -m hydra.train.pipeline "$@"
