"""Generate MT-Bench answers with plain autoregressive decoding (the speed baseline), timing every turn.

Usage:
    python llm_judge/gen_model_answer_baseline.py [--model-path HEADS_DIR_OR_HUB_ID | --base-model MODEL]
        [--model-id NAME] [--temperature 0] [--max-new-token 256] [--dtype bfloat16] [--device cuda]
        [--question-begin 0 --question-end 10] [--warmup 1] [--num-threads N]

Same harness, flags and record format as gen_model_answer_hydra.py (answer_common.py), decoding with
`ar_generate`: the same loading, KV cache and stopping code, one token per base-model forward. The heads named
by --model-path (default: the shipped heads) only select the base model; with none shipped, --base-model or
the default model is used. Use the same --max-new-token as the Hydra run you compare with.
"""

import sys

if __name__ == "__main__":
    from answer_common import main  # the script's folder is on sys.path

    sys.exit(main("baseline"))
