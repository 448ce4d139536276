"""Train Hydra draft heads on a frozen Hugging Face causal LM (a small custom loop, nanoGPT style).

Single process (CPU, or one GPU if there is one; the default base model is SmolLM2-135M-Instruct):

    python -m hydra.train.train --data_path data/self_distill.jsonl --output_dir runs/hydra-smollm2 \
        --bf16 True --hydra_num_heads 4 --hydra_num_layers 1 --hydra_head_arch hydra-mlp \
        --share_lm_head True --model_max_length 512 --per_device_train_batch_size 1 \
        --gradient_accumulation_steps 8 --num_train_epochs 2 --learning_rate 5e-4 --warmup_steps 20 \
        --lr_scheduler_type cosine --final_lr_multiplier 0.33 --lm_loss_weight 0.0 --teacher_loss_weight 1.0 \
        --eval_steps 0.1 --save_steps 0.1 --logging_steps 10 --cache_hidden_states True

Data parallel on CPU (gloo) or GPUs (nccl): the same flags under torchrun; the global batch is
per_device_train_batch_size x processes x gradient_accumulation_steps (or set --global_batch_size):

    torchrun --standalone --nproc_per_node=2 -m hydra.train.train \
        --data_path data/self_distill.jsonl --output_dir runs/hydra-ddp --bf16 True \
        --model_max_length 512 --per_device_train_batch_size 1 --gradient_accumulation_steps 4 ...

DeepSpeed ZeRO-2 (`pip install deepspeed`; the "auto" values in deepspeed.json are filled from these flags):

    torchrun --standalone --nproc_per_node=2 -m hydra.train.train \
        --data_path data/self_distill.jsonl --output_dir runs/hydra-ds --bf16 True ... \
        --deepspeed deepspeed.json

The paper's Hydra++ recipe (Vicuna-7B, 8 GPUs) in these flags:
    --hydra_head_arch prefix-mlp --hydra_num_heads 4 --hydra_num_layers 4 --grounded_heads True
    --lm_loss_weight 0.0 --teacher_loss_weight 1.0 --dropout_rate 0.2 --weight_decay 0.1
    --learning_rate 5e-4 --warmup_steps 100 --lr_scheduler_type cosine --final_lr_multiplier 0.33
    --num_train_epochs 10 --per_device_train_batch_size 4 --global_batch_size 32 --model_max_length 2048
    --bf16 True

`--data_path`: a ShareGPT .json/.jsonl file (split 95/5, seed 42) or a folder with train.jsonl + val.jsonl
(python -m hydra.data.partition_train_test). Rows are packed conversations (position_ids restart per
conversation; the base model and the loss keep them apart), never padded to model_max_length.

Loss (hydra/train/loss.py): per head i, lm_loss_weight x CE(x_{t+i+2}) + teacher_loss_weight x soft CE to the
base model's distribution, on assistant tokens only, a mean per head over the global batch, summed over heads.
Trainable head weights stay fp32; `--bf16` runs the frozen base model in bf16 and the heads under bf16
autocast (CPU or CUDA).

`--cache_hidden_states True` (multi-epoch runs on CPU) keeps the frozen base model's hidden states in
<output_dir>/hidden_cache after their first use, so later epochs and evaluations skip the base forward:
measured 1.6x (teacher loss) to 1.75x (data loss) faster per step on SmolLM2-135M, for 1.1 KiB of disk per
token in bf16. On a CPU shared with other busy processes, run with OMP_NUM_THREADS=1: on 2 cores under load,
2 threads fell to ~50 tok/s where 1 thread kept ~200 (unloaded, 2 threads reach ~350-450 tok/s).

Outputs in --output_dir: log.jsonl (one JSON object per logging / evaluation event; eval_* keys hold the
validation loss and per-head top-1/top-5 accuracy against the data and against the teacher's argmax),
resumable checkpoint-<step>/ folders (the last --save_total_limit are kept) and the final heads (config.json +
model.safetensors, loadable with HydraModel.from_pretrained(output_dir)). Rerunning the same command resumes
from the newest complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from hydra.data.sharegpt import collate_packed
from hydra.model import DEFAULT_BASE_MODEL, HEAD_ARCHS, HydraConfig, HydraModel, load_base_model
from hydra.train import checkpoint as ckpt
from hydra.train.data import BatchOrder, load_or_build_rows
from hydra.train.loss import count_targets, hydra_loss, summarize
from hydra.train.schedule import SCHEDULES, check_schedule, lr_multiplier, set_lr

# Test hook: exit abruptly (like a kill) right after this many optimizer steps, checkpoint included.
EXIT_AFTER_ENV = "HYDRA_TRAIN_EXIT_AFTER_STEP"


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": f"base model id or folder (default: {DEFAULT_BASE_MODEL})"})


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={
        "help": "ShareGPT .json/.jsonl file (split 95/5, seed 42) or a folder with train.jsonl + val.jsonl"})
    eval_split_ratio: float = field(default=0.05, metadata={
        "help": "validation fraction when data_path is a file"})
    template: Optional[str] = field(default=None, metadata={
        "help": "chat template: None = the tokenizer's own (vicuna_v1.1 if none), 'vicuna' = vicuna_v1.1"})
    max_eval_samples: Optional[int] = field(default=None, metadata={
        "help": "evaluate on at most this many val rows"})


@dataclass
class TrainingArguments:
    output_dir: str = field(default=None, metadata={"help": "checkpoints, log.jsonl and the final heads"})
    bf16: bool = field(default=False, metadata={"help": "bf16 base model, bf16 autocast for the fp32 heads"})
    tf32: bool = field(default=False, metadata={"help": "allow TF32 matmuls on CUDA"})
    use_cpu: bool = field(default=False, metadata={"help": "train on CPU even if CUDA is available"})
    num_train_epochs: float = 3.0
    max_steps: int = field(default=-1, metadata={"help": "> 0 overrides num_train_epochs"})
    global_batch_size: Optional[int] = field(default=None, metadata={
        "help": "rows per optimizer step over all processes; sets gradient_accumulation_steps"})
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: Optional[int] = None
    gradient_accumulation_steps: Optional[int] = None
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_scheduler_type: str = field(default="cosine", metadata={"help": f"one of {SCHEDULES}"})
    final_lr_multiplier: float = field(default=0.0, metadata={
        "help": "cosine/linear decay to this x learning_rate"})
    model_max_length: int = field(default=2048, metadata={"help": "tokens per packed row"})
    hydra_num_heads: int = 4
    hydra_num_layers: int = 1
    hydra_head_arch: str = field(default="hydra-mlp", metadata={"help": f"one of {HEAD_ARCHS}"})
    grounded_heads: Optional[bool] = field(default=None, metadata={
        "help": "default: False for mlp, True otherwise (mlp + True means hydra-mlp, as in the original)"})
    hidden_state_offset: int = 0
    lm_loss_weight: float = 1.0
    teacher_loss_weight: float = 0.0
    dropout_rate: float = 0.0
    noise_alpha: float = field(default=0.0, metadata={"help": "NEFTune-style noise on the token embeddings"})
    share_lm_head: bool = field(default=True, metadata={"help": "heads use the frozen base output layer"})
    deepspeed: Optional[str] = field(default=None, metadata={"help": "DeepSpeed config json (ZeRO-2)"})
    save_steps: float = field(default=0.1, metadata={
        "help": "checkpoint every N steps (< 1: a fraction of the run; 0: only at the end)"})
    save_total_limit: int = 2
    eval_steps: float = field(default=0.1, metadata={
        "help": "evaluate every N steps (< 1: a fraction of the run; 0: only at the end)"})
    logging_steps: int = 10
    seed: int = 42
    loss_chunk_size: int = field(default=256, metadata={
        "help": "positions per chunk of the vocabulary projection"})
    cache_hidden_states: bool = field(default=False, metadata={
        "help": "keep the frozen base model's hidden states on disk (<output_dir>/hidden_cache) after their "
                "first use: epochs 2+ and evaluations skip the base forward (~1.6x faster on CPU; "
                "1.1 KiB/token in bf16)"})
    local_rank: int = field(default=-1, metadata={"help": "set by launchers; LOCAL_RANK takes precedence"})


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv)
    if not data_args.data_path or not args.output_dir:
        parser.error("--data_path and --output_dir are required")
    args.lr_scheduler_type = check_schedule(args.lr_scheduler_type, args.final_lr_multiplier)
    if args.hydra_head_arch not in HEAD_ARCHS:
        parser.error(f"--hydra_head_arch must be one of {HEAD_ARCHS}")
    return model_args, data_args, args


# ---------------------------------------------------------------------------------------------------- runtime

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t)
        return t


def setup_distributed(args: TrainingArguments) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank if args.local_rank >= 0 else 0))
    use_cuda = torch.cuda.is_available() and not args.use_cpu
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                device_id=device if use_cuda else None)
    return Dist(rank, world, local_rank, device)


def step_seed(seed: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (2 ** 63)


class Logger:
    def __init__(self, output_dir: Path, enabled: bool):
        self.path = output_dir / "log.jsonl"
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop events logged after the checkpoint we continue from (they are redone)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(k + "\n" for k in kept))

    def event(self, record: dict, line: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def info(self, msg: str) -> None:
        if self.enabled:
            print(f"[hydra.train] {msg}", flush=True)


def _every(value: float, total_steps: int) -> int:
    """eval_steps / save_steps: >= 1 is a step count, (0, 1) a fraction of the run, <= 0 disabled (0)."""
    if value <= 0:
        return 0
    if value < 1:
        return max(1, math.ceil(value * total_steps))
    return int(value)


def autocast_ctx(enabled: bool, device: torch.device):
    if not enabled:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def base_forward(model: HydraModel, input_ids: torch.Tensor,
                 position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the heads read, the teacher's hidden state), both (B, S, d). The teacher is always the final
    hidden state, also when the heads read an earlier layer (hidden_state_offset > 0)."""
    k = model.config.hidden_state_offset
    with torch.no_grad():
        if k == 0:  # what HydraModel.forward runs
            h = model.base_hidden_states(input_ids, position_ids=position_ids, use_cache=False)
            return h, h
        out = model.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                            output_hidden_states=True)
        return out.hidden_states[-(k + 1)], out.last_hidden_state


def train_forward(model: HydraModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
                  noise_alpha: float = 0.0, features: tuple[torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(head_hidden (H, B, S, d), teacher_hidden (B, S, d)); `features` = base_forward's output if known."""
    feats, teacher = features if features is not None else base_forward(model, input_ids, position_ids)
    head_hidden = model.heads(feats, input_ids, model.embed_tokens, position_ids, noise_alpha)
    return head_hidden, teacher


def cached_features(model: HydraModel, cache, row_ids: list[int], batch: dict[str, torch.Tensor]):
    """base_forward through the hidden-state cache: the base model runs only if a row is missing."""
    cached = [cache.get(r) for r in row_ids]
    S = batch["input_ids"].shape[1]
    if any(c is None for c in cached):
        feats, teacher = base_forward(model, batch["input_ids"], batch["position_ids"])
        both = torch.stack([feats, teacher], dim=2)[:, :, :cache.arrays]  # (B, S, arrays, d)
        for j, r in enumerate(row_ids):
            if cached[j] is None:
                cache.put(r, both[j, :cache.lengths[r]])
        return feats, teacher
    out = torch.zeros(len(row_ids), S, cache.arrays, cache.d, dtype=cached[0].dtype)
    for j, c in enumerate(cached):
        out[j, :c.shape[0]] = c  # padding positions: zeros (never scored, never attended to by real tokens)
    out = out.to(batch["input_ids"].device, non_blocking=True)
    return out[:, :, 0], out[:, :, -1]


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _param_groups(heads: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in heads.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _deepspeed_config(path: str, args: TrainingArguments, accum: int, world: int, hidden_size: int) -> dict:
    cfg = json.loads(Path(path).read_text())

    def fill(d: dict, key: str, value):
        if d.get(key, "auto") == "auto":
            d[key] = value

    fill(cfg, "train_micro_batch_size_per_gpu", args.per_device_train_batch_size)
    fill(cfg, "gradient_accumulation_steps", accum)
    fill(cfg, "train_batch_size", args.per_device_train_batch_size * accum * world)
    fill(cfg, "gradient_clipping", args.max_grad_norm)
    for key in ("bf16", "fp16"):
        section = cfg.setdefault(key, {})
        fill(section, "enabled", args.bf16 if key == "bf16" else False)
    zero = cfg.setdefault("zero_optimization", {})
    fill(zero, "reduce_bucket_size", hidden_size * hidden_size)
    fill(zero, "allgather_bucket_size", 5e8)
    if zero.get("stage", 0) == 3:
        raise ValueError("ZeRO-3 is not supported (the heads' logits use the whole frozen output layer); "
                         "use stage 2")
    cfg.setdefault("zero_allow_untested_optimizer", True)
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ValueError(f"remove the {section!r} section from {path}: train.py owns the optimizer and "
                             "schedule (AdamW with --learning_rate/--weight_decay, --lr_scheduler_type)")
    return cfg


# ---------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    model_args, data_args, args = parse_args(argv)
    d = setup_distributed(args)
    out_dir = Path(args.output_dir)
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial(out_dir)
    d.barrier()
    log = Logger(out_dir, d.is_main)
    if args.tf32 and d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --- batch geometry
    pd = args.per_device_train_batch_size
    if args.global_batch_size:
        if args.global_batch_size % (pd * d.world):
            raise ValueError(f"--global_batch_size {args.global_batch_size} is not a multiple of "
                             f"per_device_train_batch_size x processes = {pd * d.world}")
        accum = args.global_batch_size // (pd * d.world)
        if args.gradient_accumulation_steps not in (None, accum):
            raise ValueError(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} contradicts "
                             f"--global_batch_size {args.global_batch_size} (which needs {accum})")
    else:
        accum = args.gradient_accumulation_steps or 1
    global_batch = pd * d.world * accum

    # --- model and data
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    base, tokenizer = load_base_model(model_args.model_name_or_path, dtype=dtype, device=d.device)
    if args.model_max_length > getattr(base.config, "max_position_embeddings", args.model_max_length):
        log.info(f"warning: model_max_length {args.model_max_length} > the base model's "
                 f"max_position_embeddings {base.config.max_position_embeddings}")
    train_rows, val_rows = load_or_build_rows(
        data_args.data_path, tokenizer, args.model_max_length, out_dir / "data_cache", data_args.template,
        is_main=d.is_main, barrier=d.barrier, test_size=data_args.eval_split_ratio, seed=42)
    if data_args.max_eval_samples is not None:
        val_rows = val_rows[:data_args.max_eval_samples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    config = HydraConfig(
        hydra_num_heads=args.hydra_num_heads, hydra_num_layers=args.hydra_num_layers,
        hydra_head_arch=args.hydra_head_arch, grounded_heads=args.grounded_heads,
        dropout_rate=args.dropout_rate,
        share_lm_head=args.share_lm_head, hidden_state_offset=args.hidden_state_offset,
        base_model_name_or_path=model_args.model_name_or_path or DEFAULT_BASE_MODEL)
    torch.manual_seed(args.seed)  # same initial heads on every rank
    model = HydraModel(base, config, tokenizer)
    model.heads.float()  # fp32 master weights; bf16 only inside autocast
    model.train()
    H = config.hydra_num_heads
    params = [p for p in model.heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(model.heads, args.weight_decay), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)

    order = BatchOrder(len(train_rows), global_batch, args.seed)
    total_steps = (args.max_steps if args.max_steps > 0
                   else max(1, math.ceil(args.num_train_epochs * order.steps_per_epoch)))
    eval_every, save_every = _every(args.eval_steps, total_steps), _every(args.save_steps, total_steps)

    engine = None
    if args.deepspeed:
        import deepspeed

        ds_cfg = _deepspeed_config(args.deepspeed, args, accum, d.world, base.config.hidden_size)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg,
                                                       dist_init_required=d.enabled)

    # --- resume
    start_step, tokens_seen = 0, 0
    resume = ckpt.latest_checkpoint(out_dir)
    if resume is not None:
        state = ckpt.read_state(resume)
        written_by_ds = (resume / ckpt.DEEPSPEED_DIR).is_dir()
        if written_by_ds != (engine is not None):
            raise ValueError(f"{resume} was written {'with' if written_by_ds else 'without'} --deepspeed; "
                             "resume it the same way (or use a new --output_dir)")
        if engine is not None:
            engine.load_checkpoint(str(resume / ckpt.DEEPSPEED_DIR), tag="state", load_module_strict=False)
        else:
            ckpt.load_heads(resume, model)
            ckpt.load_optimizer(resume, optimizer, d.device)
        start_step, tokens_seen = state["global_step"], state.get("tokens_seen", 0)
        if state.get("global_batch") != global_batch or state.get("total_steps") != total_steps:
            log.info(f"warning: {resume.name} was written with global batch {state.get('global_batch')} and "
                     f"{state.get('total_steps')} total steps; now {global_batch} and {total_steps}")
        log.truncate_after(start_step)
        log.info(f"resuming from {resume} (step {start_step})")

    n_params = sum(p.numel() for p in params)
    log.info(f"{config.hydra_head_arch} x {H} heads, {config.hydra_num_layers} layer(s), "
             f"{n_params / 1e6:.2f}M trainable params on {base.config.name_or_path or 'base'} ({dtype}, "
             f"{d.device}, {d.world} process(es){', deepspeed' if engine else ''})")
    log.info(f"{len(train_rows)} train rows / {len(val_rows)} val rows of <= {args.model_max_length} tokens; "
             f"global batch {global_batch} = {pd} x {d.world} x {accum}; "
             f"{order.steps_per_epoch} steps/epoch; "
             f"{total_steps} steps; eval every {eval_every or '-'}, save every {save_every or '-'}")
    if d.is_main:
        (out_dir / "training_args.json").write_text(json.dumps(
            {**asdict(model_args), **asdict(data_args), **asdict(args), "world_size": d.world}, indent=2))

    use_amp = args.bf16 and engine is None
    hcache = None
    if args.cache_hidden_states:
        from hydra.train.hidden_cache import HiddenCache

        all_rows = train_rows + val_rows  # val row j has id len(train_rows) + j
        digest = hashlib.sha256(torch.tensor([t for r in all_rows for t in r["input_ids"]], dtype=torch.int32)
                                .numpy().tobytes()).hexdigest()
        base_dtype = next(base.parameters()).dtype
        hcache = HiddenCache(out_dir / "hidden_cache",
                             {"model": model_args.model_name_or_path or DEFAULT_BASE_MODEL, "rows": digest,
                              "offset": config.hidden_state_offset},
                             [len(r["input_ids"]) for r in all_rows], base.config.hidden_size,
                             1 if config.hidden_state_offset == 0 else 2, base_dtype, create=d.is_main)
        d.barrier()
        hcache.open()
        log.info(f"hidden-state cache {hcache.folder} ({hcache.nbytes / 2**30:.2f} GiB, "
                 f"{hcache.filled()}/{len(all_rows)} rows filled)")

    def features(row_ids: list[int], batch: dict[str, torch.Tensor]):
        return None if hcache is None else cached_features(model, hcache, row_ids, batch)

    weights = dict(lm_weight=args.lm_loss_weight, teacher_weight=args.teacher_loss_weight)
    exit_after = int(os.environ.get(EXIT_AFTER_ENV, "0") or 0)

    def evaluate(step: int) -> None:
        if not val_rows:
            log.info("no validation rows; skipping evaluation")
            return
        model.eval()
        t0 = time.time()
        eb = args.per_device_eval_batch_size or pd
        mine = list(range(d.rank, len(val_rows), d.world))
        stats = torch.zeros(H, 7, dtype=torch.float64, device=d.device)
        with torch.no_grad():
            for j in range(0, len(mine), eb):
                ids = mine[j:j + eb]
                batch = _to_device(collate_packed([val_rows[r] for r in ids], pad_id), d.device)
                with autocast_ctx(use_amp, d.device):
                    feats = features([len(train_rows) + r for r in ids], batch)
                    head_hidden, teacher_hidden = train_forward(
                        model, batch["input_ids"], batch["position_ids"], features=feats)
                    _, st = hydra_loss(model, head_hidden, batch["labels"], batch["position_ids"],
                                       teacher_hidden, chunk_size=args.loss_chunk_size, topk=True,
                                       teacher_metrics=True, **weights)
                stats += st
        d.all_reduce(stats)
        model.train()
        m = summarize(stats, prefix="eval_", **weights)
        heads_txt = " ".join(f"h{i}:{m.get(f'eval_head{i}_top1', float('nan')):.3f}/"
                             f"{m.get(f'eval_head{i}_top5', float('nan')):.3f}/"
                             f"{m.get(f'eval_head{i}_teacher_top1', float('nan')):.3f}" for i in range(H))
        log.event({"step": step, "epoch": round(order.epoch(step), 4), **m, "eval_seconds": time.time() - t0},
                  f"[eval] step {step} | loss {m['eval_loss']:.4f} | top1/top5/teacher_top1 {heads_txt} "
                  f"| {time.time() - t0:.1f}s")

    def save(step: int) -> None:
        state = {"global_step": step, "total_steps": total_steps, "epoch": order.epoch(step),
                 "tokens_seen": tokens_seen, "global_batch": global_batch, "world_size": d.world,
                 "seed": args.seed}
        if engine is not None:
            engine.save_checkpoint(str(ckpt.partial_dir(out_dir, step) / ckpt.DEEPSPEED_DIR), tag="state",
                                   exclude_frozen_parameters=True)
            d.barrier()
        if d.is_main:
            ckpt.write_checkpoint(out_dir, step, model, optimizer if engine is None else None, state,
                                  keep=args.save_total_limit)
        d.barrier()
        log.info(f"saved checkpoint-{step}")

    # --- train
    stats_acc = torch.zeros(H, 7, dtype=torch.float64, device=d.device)
    interval_tokens, interval_time, last_saved, last_eval = 0, 0.0, start_step, -1
    grad_norm = float("nan")
    step = start_step
    for step in range(start_step, total_steps):
        t0 = time.time()
        torch.manual_seed(step_seed(args.seed, step, d.rank))
        rows = order.global_batch_rows(step)
        micro = [rows[(m * d.world + d.rank) * pd:(m * d.world + d.rank + 1) * pd] for m in range(accum)]
        batches = [_to_device(collate_packed([train_rows[j] for j in mb], pad_id), d.device) for mb in micro]
        normalizer = sum(count_targets(b["labels"], b["position_ids"], H) for b in batches).double()
        d.all_reduce(normalizer)
        lr = args.learning_rate * lr_multiplier(step, total_steps, args.warmup_steps, args.lr_scheduler_type,
                                                args.final_lr_multiplier)
        set_lr(optimizer, lr)
        for mb, batch in zip(micro, batches):
            with autocast_ctx(use_amp, d.device):
                head_hidden, teacher_hidden = train_forward(model, batch["input_ids"], batch["position_ids"],
                                                            args.noise_alpha, features(mb, batch))
                loss, st = hydra_loss(model, head_hidden, batch["labels"], batch["position_ids"],
                                      teacher_hidden, normalizer=normalizer, chunk_size=args.loss_chunk_size,
                                      **weights)
            stats_acc += st
            if engine is not None:
                # The loss is normalised by the global batch's token count already; DeepSpeed averages over
                # ranks and, with scale_wrt_gas=False, does not divide by the accumulation steps.
                engine.backward(loss * d.world, scale_wrt_gas=False)
                # no_grad: gloo's all_gather fallback refuses in-place copies into views otherwise
                with torch.no_grad():
                    engine.step()
            else:
                loss.backward()
            del head_hidden, teacher_hidden, loss
        if engine is None:
            if d.enabled:
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat)  # the loss is already normalised by the global token count: sum
                offset = 0
                for p in params:
                    n = p.numel()
                    p.grad = flat[offset:offset + n].view_as(p)
                    offset += n
            if args.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            grad_norm = float(engine.get_global_grad_norm() or float("nan"))
        step_tokens = sum(len(train_rows[j]["input_ids"]) for j in rows)
        tokens_seen += step_tokens
        interval_tokens += step_tokens
        interval_time += time.time() - t0
        done = step + 1

        if args.logging_steps > 0 and (done % args.logging_steps == 0
                                       or done in (total_steps, start_step + 1)):
            d.all_reduce(stats_acc)
            m = summarize(stats_acc, **weights)
            tps = interval_tokens / max(interval_time, 1e-9)
            rec = {"step": done, "epoch": round(order.epoch(done), 4), **m, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": tps, "tokens_seen": tokens_seen}
            heads_txt = " ".join(f"{m.get(f'head{i}_loss', float('nan')):.3f}" for i in range(H))
            log.event(rec, f"step {done}/{total_steps} | loss {m['loss']:.4f} (heads {heads_txt}) "
                           f"| lr {lr:.2e} | grad_norm {grad_norm:.3f} | {tps:.0f} tok/s")
            stats_acc.zero_()
            interval_tokens, interval_time = 0, 0.0
        if eval_every and done % eval_every == 0:
            evaluate(done)
            last_eval = done
        if save_every and done % save_every == 0:
            save(done)
            last_saved = done
        if exit_after and done == exit_after:
            log.info(f"{EXIT_AFTER_ENV}={exit_after}: exiting abruptly")
            sys.stdout.flush()
            os._exit(3)

    final_step = max(start_step, total_steps)
    if last_eval != final_step and start_step < total_steps:
        evaluate(final_step)
    if last_saved != final_step or ckpt.latest_checkpoint(out_dir) is None:
        save(final_step)
    if d.is_main:
        model.save_pretrained(out_dir, dtype=torch.float32)
        log.info(f"done: {final_step} steps; heads saved to {out_dir}")
    d.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
