"""Generate MT-Bench answers with Hydra speculative decoding, timing every turn.

Usage:
    python llm_judge/gen_model_answer_hydra.py --model-path HEADS_DIR_OR_HUB_ID [--model-id NAME]
        [--tree mc_sim_7b_63] [--temperature 0] [--max-new-token 256] [--dtype bfloat16] [--device cuda]
        [--question-begin 0 --question-end 10] [--warmup 1] [--num-threads N]

Writes llm_judge/data/mt_bench/model_answer/<model-id>.jsonl (FastChat answer format plus per-turn wall_time,
new_tokens, steps and per-step accept_lengths); rerunning skips questions already answered. Compare with the
same flags given to gen_model_answer_baseline.py, then run show_speed.py. See answer_common.py for the
record format.
"""

import sys

if __name__ == "__main__":
    from answer_common import main  # the script's folder is on sys.path

    sys.exit(main("hydra"))
