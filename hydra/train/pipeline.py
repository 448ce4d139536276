r"""Rebuild the default Hydra++ heads end to end; every stage skips what is done and resumes what was killed.

    scripts/train_default_heads.sh                                  # CPU, over as many sessions as it takes
    scripts/train_default_heads.sh --device cuda                    # one GPU
    scripts/train_default_heads.sh --data data/self_distill_smollm2.jsonl.gz   # skip the distillation
    scripts/train_default_heads.sh --data data/self_distill_smollm2.jsonl.gz \
        data/self_distill_smollm2_more.jsonl.gz --init-heads hydra/heads/default  # all committed chats
    scripts/train_default_heads.sh --device cuda --sampled-passes 2 # + two sampled replies per prompt
    scripts/train_default_heads.sh --dry-run                        # print the stages and commands only

Stages, in <workdir> (default runs/default-heads):
  distill   python -m hydra.data.self_distill -> self_distill.jsonl (resumes by conversation id)
  sample<k> with --sampled-passes N, k = 1..N: the same, sampled (temperature 0.7, top-p 0.95, seed k)
            -> sampled_s<k>.jsonl, training data only; it starts from the committed replies of that pass
            (data/self_distill_smollm2_sampled_s<k>.jsonl.gz: the same prompts and sampling settings) when
            the workdir has none yet and the base model and prompts are the default ones
  split     python -m hydra.data.partition_train_test -> split/{train,val}.jsonl (files after the first --data
            file go to training only, so the validation chats stay those of the first)
  features  hydra.train.train --fill_hidden_cache only: the feature cache (resumes by row)
  train     hydra.train.train, Hydra++ with the teacher loss over the draft vocabulary -> heads/ (resumes from
            its newest checkpoint)
  tree      scripts/build_tree.py: the tree chosen for the new heads (they keep the draft vocabulary they
            were trained over)
  mtbench   scripts/eval_mt_bench.sh heads/: MT-Bench speed over plain decoding and fp32 losslessness
A stage is done when its marker `.done/<stage>` exists, written only after its command succeeded; a killed
stage has no marker, so the next run starts it again and the command itself resumes. The time-left estimate
uses the throughput of the stages measured on this workdir so far (state.json), else rough defaults.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Rough throughput defaults for the first estimate only (work units per second); measured rates replace them.
# CPU: features ~ the fifth CPU run's fill rate (~390-510 trained tokens/s, heads training beside it); train
# ~ its rate on rows read from the feature cache (assets/training_logs/README.md, "A fifth run").
DEFAULT_RATES = {
    "cpu": {"distill": 0.3, "sample": 0.3, "split": 1e3, "features": 450.0, "train": 1250.0, "tree": 0.15,
            "mtbench": 0.06},
    "cuda": {"distill": 40.0, "sample": 40.0, "split": 1e3, "features": 2e5, "train": 5e4, "tree": 2.0,
             "mtbench": 0.5},
}


def _kind(stage: str) -> str:
    """The key of a stage's rate: sample1, sample2, ... share one."""
    return stage.rstrip("0123456789")


@dataclass
class Stage:
    name: str
    cmd: list[str]
    work: float  # in the stage's unit (prompts, conversations, tokens, ...), for the time estimate
    env: dict[str, str] = field(default_factory=dict)
    # (committed .jsonl.gz, output): decompressed into output before the command, if output does not exist
    # yet; the command then resumes after the committed conversations
    starts_from: tuple[Path, Path] | None = None


def train_flags(a: argparse.Namespace, split: Path) -> list[str]:
    """The Hydra++ recipe of the shipped heads (README "Trained heads shipped in this repository") on the fast
    path, with dropout off unless --dropout says otherwise."""
    flags = ["--data_path", str(split), "--bf16", str(a.train_dtype == "bfloat16"),
             "--hydra_num_heads", "4", "--hydra_num_layers", "4",
             "--hydra_head_arch", "prefix-mlp", "--share_lm_head", "True", "--lm_loss_weight", "0.0",
             "--teacher_loss_weight", "1.0", "--dropout_rate", str(a.dropout),
             "--model_max_length", str(a.max_length),
             "--per_device_train_batch_size", str(a.rows), "--global_batch_size", "16",
             "--num_train_epochs", str(a.epochs), "--learning_rate", str(a.lr), "--warmup_steps", "40",
             "--lr_scheduler_type", "cosine", "--final_lr_multiplier", "0.1", "--eval_steps", "0.1",
             "--save_steps", str(a.save_steps), "--logging_steps", "5", "--cache_hidden_states", "True",
             "--hidden_cache_dir", str(a.workdir / "features"), "--draft_vocab", str(a.draft_vocab)]
    if a.prefix_reads_next_token:
        flags += ["--prefix_reads_next_token", "True"]
    if a.prefix_num_layers != 1:
        flags += ["--prefix_num_layers", str(a.prefix_num_layers)]
    if a.feature_layers:
        flags += ["--feature_layers", *map(str, a.feature_layers)]
    if a.time_budget:
        flags += ["--time_budget_minutes", str(a.time_budget)]
    if a.device == "cpu":
        flags += ["--use_cpu", "True"]
    if a.base_model:
        flags += ["--model_name_or_path", a.base_model]
    return flags


def stages(a: argparse.Namespace) -> list[Stage]:
    py, w = [sys.executable], a.workdir
    data, *extra = [Path(d) for d in a.data] if a.data else [w / "self_distill.jsonl"]
    split = w / "split"
    n_sample_prompts = a.num_prompts or 25_323  # the training prompts, for the time estimate
    n_prompts = count_conversations(a.data) if a.data else n_sample_prompts
    # ~300 trained tokens per conversation: the fifth CPU run's 24,794 committed chats packed into 554 steps
    # of 16 rows of 1,024 positions, ~13,470 trained tokens per step
    tokens = (n_prompts + a.sampled_passes * n_sample_prompts) * 300
    batch = "256" if a.device == "cuda" else "32"
    base = ["--base-model", a.base_model] if a.base_model else []

    def distill(output: Path, sampling: list[str]) -> list[str]:
        return (py + ["-m", "hydra.data.self_distill", "--prompts", a.prompts, "--output", str(output),
                      "--max-new-tokens", "320", "--max-prompt-tokens", "768", *sampling,
                      "--batch-size", batch, "--dtype", a.train_dtype, "--device", a.device] + base
                + (["--num-prompts", str(a.num_prompts)] if a.num_prompts else []))

    # A second, third, ... reply per prompt, sampled (README, Training data, "Sampled replies"): training
    # only, after the greedy chats, so the validation chats and the feature cache's rows stay those of the
    # greedy data.
    sampled = [w / f"sampled_s{k}.jsonl" for k in range(1, a.sampled_passes + 1)]
    extra = extra + sampled
    default_inputs = (not a.base_model and not a.num_prompts
                      and Path(a.prompts).resolve() == (REPO / "data" / "train_prompts.jsonl.gz").resolve())

    def sample(k: int, output: Path) -> Stage:
        committed = REPO / "data" / f"self_distill_smollm2_sampled_s{k}.jsonl.gz"
        start = (committed, output) if default_inputs and committed.is_file() else None
        answered = output if _has_data(output) else committed if start else None
        done = count_conversations([str(answered)]) if answered else 0
        sampling = ["--temperature", "0.7", "--top-p", "0.95", "--seed", str(k)]
        return Stage(f"sample{k}", distill(output, sampling), max(n_sample_prompts - done, 1),
                     starts_from=start)

    out = [
        Stage("distill", distill(data, ["--temperature", "0"]), n_prompts),
        *(sample(k, f) for k, f in enumerate(sampled, start=1)),
        Stage("split", py + ["-m", "hydra.data.partition_train_test", "--input", str(data),
                             "--output-dir", str(split)]
              + (["--extra-train", *map(str, extra)] if extra else []), n_prompts),
        Stage("features", py + ["-m", "hydra.train.train"] + train_flags(a, split)
              + ["--output_dir", str(w / "heads"), "--fill_hidden_cache", "only"], tokens),
        Stage("train", py + ["-m", "hydra.train.train"] + train_flags(a, split)
              + ["--output_dir", str(w / "heads")] + (["--init_heads", a.init_heads] if a.init_heads else []),
              tokens * a.epochs),
        Stage("tree", py + [str(REPO / "scripts" / "build_tree.py"), "--heads", str(w / "heads"),
                            "--data", str(split / "val.jsonl"), "--name", a.tree_name,
                            "--counts", str(w / "tree_counts.json")], 100),
        Stage("mtbench", ["bash", str(REPO / "scripts" / "eval_mt_bench.sh"), str(w / "heads")], 160,
              env={"TAG": a.tree_name, "TREE": a.tree_name, "DTYPE": a.train_dtype}),
    ]
    if a.data:
        out = out[1:]  # the data are given: no distillation
    return [s for s in out if s.name not in a.skip]


def count_conversations(files: list[str]) -> int:
    """Lines of the given .jsonl(.gz) files (one conversation each), for the time estimate; a .json list or a
    missing file counts as nothing here (the split stage reports it)."""
    total = 0
    for name in files:
        if name.endswith((".jsonl", ".jsonl.gz")) and os.path.isfile(name):
            with (gzip.open(name, "rt") if name.endswith(".gz") else open(name)) as f:
                total += sum(1 for _ in f)
    return total


def _has_data(path: Path) -> bool:
    """A stage output holds something (an empty one is what a distillation killed before its first batch
    leaves)."""
    return path.is_file() and path.stat().st_size > 0


def _fmt(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def run_stages(todo: list[Stage], workdir: Path, device: str, dry_run: bool = False,
               log=print) -> int:
    """Run the stages not marked done, in order; stop at the first failure (its marker is not written)."""
    marks = workdir / ".done"
    state_path = workdir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    rates = {**DEFAULT_RATES.get(device, DEFAULT_RATES["cpu"]), **state.get("rates", {})}
    for k, stage in enumerate(todo):
        if (marks / stage.name).is_file():
            log(f"[pipeline] {k + 1}/{len(todo)} {stage.name}: done, skipped")
            continue
        seconds = {s.name: s.work / rates.get(_kind(s.name), 1.0) for s in todo[k:]}
        left = sum(t for name, t in seconds.items() if not (marks / name).is_file())
        log(f"[pipeline] {k + 1}/{len(todo)} {stage.name}: ~{_fmt(seconds[stage.name])} "
            f"(all stages left: ~{_fmt(left)})\n  {shlex.join(stage.cmd)}")
        if stage.starts_from and not _has_data(stage.starts_from[1]):
            source, output = stage.starts_from
            log(f"[pipeline] {stage.name}: starting from the committed {os.path.relpath(source, REPO)}")
            if not dry_run:
                output.parent.mkdir(parents=True, exist_ok=True)
                partial = output.with_name(output.name + ".partial")  # a killed copy leaves no output
                with gzip.open(source, "rb") as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
                os.replace(partial, output)
        if dry_run:
            continue
        t0 = time.time()
        rc = subprocess.call(stage.cmd, cwd=REPO, env={**os.environ, **stage.env})
        if rc != 0:
            log(f"[hydra] error: stage {stage.name} failed (exit {rc}); run the same command again to "
                "resume it")
            return rc
        marks.mkdir(parents=True, exist_ok=True)
        (marks / stage.name).write_text(f"{time.time() - t0:.0f} s\n")
        kind = _kind(stage.name)
        rates[kind] = stage.work / max(time.time() - t0, 1e-3)
        state["rates"] = {**state.get("rates", {}), kind: rates[kind]}
        state_path.write_text(json.dumps(state, indent=2))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "default-heads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--data", type=os.path.expanduser, nargs="+", default=None,
                   help="self-distilled ShareGPT files to use instead of distilling (the validation chats "
                        "come from the first; the others go to training only)")
    p.add_argument("--prompts", type=os.path.expanduser,
                   default=str(REPO / "data" / "train_prompts.jsonl.gz"))
    p.add_argument("--num-prompts", type=int, default=None, help="distill only the first N prompts")
    p.add_argument("--sampled-passes", type=int, default=0,
                   help="also sample N more replies per prompt (temperature 0.7, top-p 0.95, seeds 1..N), "
                        "for training only: more distinct text than passes over the greedy replies")
    p.add_argument("--base-model", type=os.path.expanduser,
                   default=None, help="base model id or folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--init-heads", type=os.path.expanduser,
                   default=None, help="continue from these heads instead of a fresh init")
    p.add_argument("--draft-vocab", type=lambda v: Path(os.path.expanduser(v)),
                   default=REPO / "hydra" / "heads" / "default" / "draft_vocab.safetensors")
    p.add_argument("--train-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="the base model's dtype in every stage (train.py --bf16 in the feature and train "
                        "stages); auto: bfloat16 where the device computes it natively, else float32")
    p.add_argument("--prefix-reads-next-token", action="store_true",
                   help="train.py --prefix_reads_next_token True: the prefix layer also reads x_{t+1} "
                        "(README, Head types; not the shipped heads' recipe)")
    p.add_argument("--prefix-num-layers", type=int, default=1,
                   help="train.py --prefix_num_layers: decoder layers in the prefix (README, Head types)")
    p.add_argument("--feature-layers", type=int, nargs="+", default=[],
                   help="train.py --feature_layers: earlier base layers the heads also read "
                        "(README, Head types)")
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="train.py --dropout_rate (the paper's Hydra++ recipe: 0.2; without dropout the "
                        "heads learned faster here: assets/training_logs/README.md, \"Dropout off\")")
    p.add_argument("--rows", type=int, default=4, help="packed rows per device per micro-batch")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="minutes of training (train.py --time_budget_minutes): the planned epochs are cut, "
                        "at the end of the warm-up, to what fits at the measured rate")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--save-steps", default="20")
    p.add_argument("--tree-name", default="smollm2_hydrapp_rebuilt")
    p.add_argument("--skip", nargs="*", default=[], help="stages to leave out (e.g. mtbench)")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    a.workdir = a.workdir.expanduser()
    a.prompts = os.path.expanduser(a.prompts)
    a.draft_vocab = a.draft_vocab.expanduser()
    if a.train_dtype == "auto":
        from hydra.model.base_model import resolve_dtype  # torch: only when there is something to resolve

        a.train_dtype = resolve_dtype(a.train_dtype, a.device)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    return run_stages(stages(a), a.workdir, a.device, a.dry_run)


if __name__ == "__main__":
    raise SystemExit(main())
