#!/usr/bin/env bash
# MT-Bench speed comparison on this machine: plain decoding vs Medusa / Hydra / Hydra++ heads, all 80 questions,
# both turns, greedy; then the fp32 losslessness check and the speed report + plot.
#
#   scripts/eval_mt_bench.sh runs/medusa runs/hydra runs/hydrapp      # heads folders (default: the shipped heads)
#
# Environment: DTYPE (bfloat16), MAX_NEW (128), THREADS (torch threads; 1 is the robust choice on a shared
# machine, where OpenMP threads spinning on busy cores run many times slower), LOSSLESS_MAX_NEW (64), TAG (name prefix),
# TREE (one tree for every head set, e.g. smollm2_hydrapp; default: each heads folder's own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DTYPE=${DTYPE:-bfloat16}; MAX_NEW=${MAX_NEW:-128}; THREADS=${THREADS:-1}; LOSSLESS_MAX_NEW=${LOSSLESS_MAX_NEW:-64}
TAG=${TAG:-smollm2}
OUT=llm_judge/data/mt_bench/model_answer
HEADS=("$@"); [ ${#HEADS[@]} -gt 0 ] || HEADS=(hydra/heads/default)
common=(--dtype "$DTYPE" --max-new-token "$MAX_NEW" --num-threads "$THREADS")
tree=(); [ -z "${TREE:-}" ] || tree=(--tree "$TREE")
$PY llm_judge/gen_model_answer_baseline.py "${common[@]}" --model-id "$TAG-ar-$DTYPE" --answer-file "$OUT/$TAG-ar-$DTYPE.jsonl"
files=()
for h in "${HEADS[@]}"; do
  name=$(basename "$h")
  $PY llm_judge/gen_model_answer_hydra.py "${common[@]}" "${tree[@]}" --model-path "$h" --model-id "$TAG-$name-$DTYPE" \
    --answer-file "$OUT/$TAG-$name-$DTYPE.jsonl"
  files+=("$OUT/$TAG-$name-$DTYPE.jsonl")
done
$PY llm_judge/show_speed.py --baseline "$OUT/$TAG-ar-$DTYPE.jsonl" --hydra "${files[@]}" --check-equal \
  --plot "assets/mt_bench_speedup_$DTYPE.png" --title "MT-Bench speedup over plain decoding ($DTYPE, CPU)"
# Losslessness: fp32 greedy speculative output must equal fp32 greedy plain output.
lossless=(--dtype float32 --max-new-token "$LOSSLESS_MAX_NEW" --num-threads "$THREADS")
$PY llm_judge/gen_model_answer_baseline.py "${lossless[@]}" --model-id "$TAG-ar-fp32" --answer-file "$OUT/$TAG-ar-fp32.jsonl"
files=()
for h in "${HEADS[@]}"; do
  name=$(basename "$h")
  $PY llm_judge/gen_model_answer_hydra.py "${lossless[@]}" "${tree[@]}" --model-path "$h" --model-id "$TAG-$name-fp32" \
    --answer-file "$OUT/$TAG-$name-fp32.jsonl"
  files+=("$OUT/$TAG-$name-fp32.jsonl")
done
$PY llm_judge/show_speed.py --baseline "$OUT/$TAG-ar-fp32.jsonl" --hydra "${files[@]}" --check-equal
