r"""Train Hydra draft heads on a frozen Hugging Face causal LM (README "Training" explains every flag).

One process (CPU, or one GPU if there is one); the default base model is SmolLM2-135M-Instruct:

    python -m hydra.train.train --data_path data/self_distill_smollm2.jsonl.gz --output_dir runs/hydrapp \
        --bf16 True --hydra_num_heads 4 --hydra_num_layers 4 --hydra_head_arch prefix-mlp \
        --share_lm_head True --lm_loss_weight 0.0 --teacher_loss_weight 1.0 --dropout_rate 0.2 \
        --model_max_length 512 --per_device_train_batch_size 1 --gradient_accumulation_steps 8 \
        --num_train_epochs 2 --learning_rate 5e-4 --warmup_steps 20 --lr_scheduler_type cosine \
        --final_lr_multiplier 0.33 --eval_steps 0.1 --save_steps 0.1 --logging_steps 10

The fast path (feature cache + loss over the draft vocabulary), same flags plus:

        --cache_hidden_states True --draft_vocab hydra/heads/default/draft_vocab.safetensors

Continue from trained heads instead of a fresh init: add --init_heads hydra/heads/default.
Continue a run whose checkpoints were lost, from the heads it exported at step N: its command with
--init_heads <those heads> --start_step N (a new --output_dir).
Cool a run's checkpoint down for shipping, leaving the run to go on: its command with
--decay_from <output_dir>/checkpoint-S --decay_steps 25 (a new --output_dir).
A Hydra++ prefix layer that also reads the next token (README, Head types): add
--prefix_reads_next_token True.
Also score the heads on the user turns' text of the training chats: add --train_on_inputs True.
Fill the feature cache only (then exit): add --cache_hidden_states True --fill_hidden_cache only.
Resume a killed run: run the same command again.
Evaluate heads on the validation rows only: add --init_heads <heads folder> --eval_only True.

Data parallel on CPU (gloo) or GPUs (nccl):

    torchrun --standalone --nproc_per_node=2 -m hydra.train.train <the same flags>

DeepSpeed ZeRO-2 (pip install -e ".[train]"):

    torchrun --standalone --nproc_per_node=2 -m hydra.train.train <the same flags> --deepspeed deepspeed.json

The paper's Hydra++ recipe (Vicuna-7B, 8 GPUs):

    torchrun --standalone --nproc_per_node=8 -m hydra.train.train --model_name_or_path lmsys/vicuna-7b-v1.3 \
        --data_path <sharegpt.json> --output_dir runs/hydrapp-vicuna --template vicuna \
        --hydra_head_arch prefix-mlp --hydra_num_heads 4 --hydra_num_layers 4 --grounded_heads True \
        --share_lm_head False --lm_loss_weight 0.0 --teacher_loss_weight 1.0 --dropout_rate 0.2 \
        --weight_decay 0.1 --learning_rate 5e-4 --warmup_steps 100 --lr_scheduler_type cosine \
        --final_lr_multiplier 0.33 --num_train_epochs 10 --per_device_train_batch_size 4 \
        --global_batch_size 32 --model_max_length 2048 --bf16 True
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hydra.data.sharegpt import collate_packed
from hydra.model import DEFAULT_BASE_MODEL, HEAD_ARCHS, HydraConfig, HydraModel, load_base_model
from hydra.model.base_model import cache_dir
from hydra.train import checkpoint as ckpt
from hydra.train import hidden_cache
from hydra.train.data import BatchOrder, load_or_build_rows
from hydra.train.loss import count_targets, hydra_loss, new_stats, summarize
from hydra.train.runtime import Dist, Logger, autocast_ctx, every, setup_distributed, step_seed
from hydra.train.schedule import (
    MIN_TIMED_STEPS,
    SCHEDULES,
    check_schedule,
    cooldown_multiplier,
    lr_multiplier,
    set_lr,
    steps_within_budget,
)

# Test hook: exit abruptly (like a kill) right after this many optimizer steps, checkpoint included.
EXIT_AFTER_ENV = "HYDRA_TRAIN_EXIT_AFTER_STEP"
HEAD_INITS = ("paper", "medusa")
FILL_MODES = ("lazy", "first", "only")
PATH_ARGS = ("model_name_or_path", "data_path", "output_dir", "deepspeed", "hidden_cache_dir", "draft_vocab",
             "init_heads")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": f"base model id or folder (default: {DEFAULT_BASE_MODEL})"})


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={
        "help": "ShareGPT .json/.jsonl file (split 95/5, seed 42) or a folder with train.jsonl + val.jsonl"})
    eval_split_ratio: float = field(default=0.05, metadata={
        "help": "validation fraction when data_path is a file"})
    template: str | None = field(default=None, metadata={
        "help": "chat template: None = the tokenizer's own (vicuna_v1.1 if none), 'vicuna' = vicuna_v1.1"})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "evaluate on at most this many val rows"})
    train_on_inputs: bool = field(default=False, metadata={
        "help": "also score the heads on the text of the training chats' user turns (not the system prompt "
                "or the template markup): more distinct text per chat; with the teacher loss the target is "
                "the base model's own distribution there too. Validation stays replies-only"})


@dataclass
class TrainingArguments:
    output_dir: str = field(default=None, metadata={"help": "checkpoints, log.jsonl and the final heads"})
    bf16: bool = field(default=False, metadata={"help": "bf16 base model, bf16 autocast for the fp32 heads"})
    bf16_heads: bool = field(default=True, metadata={
        "help": "with --bf16: the heads' arithmetic in bf16 autocast; False: in fp32, faster on CPUs whose "
                "bf16 matrix products are slower than fp32 ones (README, Training speed); the base stays "
                "bf16"})
    tf32: bool = field(default=False, metadata={"help": "allow TF32 matmuls on CUDA"})
    use_cpu: bool = field(default=False, metadata={"help": "train on CPU even if CUDA is available"})
    num_train_epochs: float = 3.0
    max_steps: int = field(default=-1, metadata={"help": "> 0 overrides num_train_epochs"})
    time_budget_minutes: float = field(default=0.0, metadata={
        "help": "> 0: at the end of the warm-up, cut the planned steps to what fits in this many minutes of "
                "this run's wall time at the rate measured so far, so the schedule still ends at the last "
                "step; the count is saved with the checkpoints and a resumed run keeps it"})
    global_batch_size: int | None = field(default=None, metadata={
        "help": "rows per optimizer step over all processes; sets gradient_accumulation_steps"})
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
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
    grounded_heads: bool | None = field(default=None, metadata={
        "help": "default: False for mlp, True otherwise (mlp + True means hydra-mlp, as in the original)"})
    hidden_state_offset: int = 0
    prefix_reads_next_token: bool = field(default=False, metadata={
        "help": "prefix-mlp only: the prefix layer reads h_t + W rms_norm(e(x_{t+1})) (W starts at zero, so "
                "--init_heads from heads without it continue exactly)"})
    feature_layers: list[int] = field(default_factory=list, metadata={
        "help": "hidden_states indices (0 = embeddings, i = after decoder layer i) the heads read besides "
                "the final hidden state, fused (EAGLE-3 style; e.g. 2 15 27 on a 30-layer base). Fusion "
                "starts as the identity, so --init_heads from heads without it continue exactly"})
    prefix_num_layers: int = field(default=1, metadata={
        "help": "prefix-mlp only: decoder layers in the prefix; layers after the first start as the "
                "identity, so --init_heads from heads with fewer continue exactly"})
    lm_loss_weight: float = 1.0
    teacher_loss_weight: float = 0.0
    feature_loss_weight: float = field(default=0.0, metadata={
        "help": "EAGLE-style regression of each head's hidden state onto the base's final hidden state whose "
                "projection is the teacher distribution (hydra/train/loss.py)"})
    head_loss_weights: list[float] = field(default_factory=list, metadata={
        "help": "one weight per head for its loss (default: all 1, the paper's uniform sum)"})
    teacher_temperature: float = field(default=1.0, metadata={
        "help": "the teacher distribution is softmax(base logits / T); T < 1 sharpens it towards the argmax"})
    dropout_rate: float = 0.0
    noise_alpha: float = field(default=0.0, metadata={"help": "NEFTune-style noise on the token embeddings"})
    share_lm_head: bool = field(default=True, metadata={"help": "heads use the frozen base output layer"})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed config json (ZeRO-2)"})
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
        "help": "feature cache: keep the frozen base model's hidden states on disk, reused by every epoch "
                "and by every later run for the packed rows it shares (hydra/train/hidden_cache.py)"})
    hidden_cache_dir: str | None = field(default=None, metadata={
        "help": "where the feature cache lives (default: ~/.cache/hydra/hidden_cache)"})
    fill_hidden_cache: str = field(default="lazy", metadata={
        "help": f"one of {FILL_MODES}: cache rows when first used / fill all before training / fill and "
                "exit"})
    draft_vocab: str | None = field(default=None, metadata={
        "help": "score the loss over this draft vocabulary (a draft_vocab.safetensors of token ids) instead "
                "of the whole vocabulary; it is saved with the heads"})
    init_heads: str | None = field(default=None, metadata={
        "help": "start from these trained heads (a heads folder whose config matches the --hydra_* flags)"})
    start_step: int = field(default=0, metadata={
        "help": "with --init_heads: begin at this step of the schedule (its rows and learning rate on), "
                "with fresh optimizer moments and the learning rate warmed up again over --warmup_steps: "
                "continues a run whose checkpoints were lost from the heads it exported at that step"})
    decay_from: str | None = field(default=None, metadata={
        "help": "a cool-down branch: resume this checkpoint of a run (heads, optimizer moments, step S, "
                "tokens seen) into a new --output_dir and train --decay_steps more steps on the run's next "
                "rows, the learning rate falling linearly from the schedule's at step S towards zero. The "
                "run itself is left as it is and can go on (warmup-stable-decay: ship the branch's heads, "
                "continue the run)"})
    decay_steps: int = field(default=0, metadata={"help": "with --decay_from: the branch's length in steps"})
    head_init: str = field(default="paper", metadata={
        "help": f"one of {HEAD_INITS}: fresh grounded heads as in the paper's code, or with an identity-like "
                "first block so a fresh grounded head equals a fresh Medusa head"})
    eval_only: bool = field(default=False, metadata={
        "help": "only evaluate (the --init_heads heads, or the newest checkpoint) on the validation rows"})
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
    if args.prefix_reads_next_token and args.hydra_head_arch != "prefix-mlp":
        parser.error("--prefix_reads_next_token needs --hydra_head_arch prefix-mlp "
                     "(only Hydra++ has a prefix layer)")
    if args.prefix_num_layers != 1 and args.hydra_head_arch != "prefix-mlp":
        parser.error("--prefix_num_layers needs --hydra_head_arch prefix-mlp (only Hydra++ has a prefix "
                     "layer)")
    if args.prefix_num_layers < 1:
        parser.error(f"--prefix_num_layers must be >= 1, got {args.prefix_num_layers}")
    if args.head_init not in HEAD_INITS:
        parser.error(f"--head_init must be one of {HEAD_INITS}")
    if args.fill_hidden_cache not in FILL_MODES:
        parser.error(f"--fill_hidden_cache must be one of {FILL_MODES}")
    if args.start_step < 0 or (args.start_step and not args.init_heads):
        parser.error("--start_step continues exported heads: a step >= 0, with the heads as --init_heads")
    if bool(args.decay_from) != (args.decay_steps > 0):
        parser.error("--decay_from <checkpoint> and --decay_steps N > 0 make a cool-down branch together")
    if args.decay_from and (args.deepspeed or args.time_budget_minutes > 0):
        parser.error("--decay_from branches a plain run: not with --deepspeed or --time_budget_minutes")
    if args.head_loss_weights and (len(args.head_loss_weights) != args.hydra_num_heads
                                   or min(args.head_loss_weights) < 0 or not any(args.head_loss_weights)):
        parser.error(f"--head_loss_weights needs {args.hydra_num_heads} weights >= 0 (one per head, not all "
                     f"0), got {args.head_loss_weights}")
    if args.teacher_temperature <= 0:
        parser.error(f"--teacher_temperature must be > 0, got {args.teacher_temperature}")
    if args.fill_hidden_cache != "lazy" and not args.cache_hidden_states:
        parser.error("--fill_hidden_cache needs --cache_hidden_states True")
    for group in (model_args, data_args, args):
        for name in PATH_ARGS:
            if getattr(group, name, None):
                setattr(group, name, os.path.expanduser(getattr(group, name)))
    return model_args, data_args, args


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




@dataclass
class Run:
    """Everything `setup` builds and `fit` / `validate` / `save` use."""
    args: TrainingArguments
    d: Dist
    log: Logger
    out_dir: Path
    model: HydraModel
    optimizer: Any
    engine: Any  # a DeepSpeed engine, or None
    params: list[torch.nn.Parameter]
    train_rows: list[dict]
    val_rows: list[dict]
    pad_id: int
    order: BatchOrder
    accum: int
    global_batch: int
    total_steps: int
    vocab: torch.Tensor | None
    cache: hidden_cache.HiddenCache | None
    start_step: int = 0
    tokens_seen: int = 0
    budgeted: bool = False  # total_steps was fixed by --time_budget_minutes
    decay_start: int | None = None  # a cool-down branch (--decay_from) from this step of the run
    schedule_steps: int = 0  # a branch's run's own length, which its schedule's factor at decay_start is of

    def cool_down_from(self, start: int) -> None:
        """Make this a cool-down branch from step `start` of the run its command describes: it ends
        --decay_steps later, its learning rate taken from the run's schedule at `start`."""
        self.decay_start, self.schedule_steps = start, self.total_steps
        self.total_steps = start + self.args.decay_steps

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step`: the schedule's, or a cool-down branch's from it."""
        a = self.args

        def scheduled(s: int, total: int) -> float:
            return lr_multiplier(s, total, a.warmup_steps, a.lr_scheduler_type, a.final_lr_multiplier,
                                 restarted_at=a.start_step)

        if self.decay_start is None:
            return a.learning_rate * scheduled(step, self.total_steps)
        start = scheduled(self.decay_start, self.schedule_steps)
        return a.learning_rate * cooldown_multiplier(start, step, self.decay_start, a.decay_steps)

    @property
    def use_amp(self) -> bool:
        """bf16 autocast around the heads (and an uncached base forward)."""
        return self.args.bf16 and self.args.bf16_heads and self.engine is None

    @property
    def base_amp(self) -> bool:
        """bf16 autocast around the base forward that fills the feature cache (fill_cache and lazily in
        forward): independent of --bf16_heads, so the cached features are the same whichever arithmetic the
        heads use."""
        return self.args.bf16 and self.engine is None

    @property
    def loss_weights(self) -> dict[str, float | list[float] | None]:
        return dict(lm_weight=self.args.lm_loss_weight, teacher_weight=self.args.teacher_loss_weight,
                    feature_weight=self.args.feature_loss_weight,
                    head_weights=self.args.head_loss_weights or None)

    @property
    def loss_options(self) -> dict[str, float | list[float] | None]:
        """Keyword arguments of hydra_loss beyond the batch: the weights and the teacher's temperature."""
        return dict(self.loss_weights, teacher_temperature=self.args.teacher_temperature)

    def batch(self, row_ids: list[int]) -> dict[str, torch.Tensor]:
        """Rows by id (train rows first, then val rows) as one padded, packed batch on the device."""
        rows = [self.train_rows[r] if r < len(self.train_rows) else self.val_rows[r - len(self.train_rows)]
                for r in row_ids]
        return {k: v.to(self.d.device, non_blocking=True)
                for k, v in collate_packed(rows, self.pad_id).items()}

    def forward(self, row_ids: list[int], batch: dict[str, torch.Tensor], noise_alpha: float = 0.0):
        feats = None
        if self.cache is not None:  # a row filled here (lazily) is computed as fill_cache computes it
            with autocast_ctx(self.base_amp, self.d.device):
                feats = hidden_cache.cached_features(self.model, self.cache, row_ids, batch)
        return self.model(batch["input_ids"], batch["position_ids"], noise_alpha=noise_alpha, features=feats)


def batch_geometry(args: TrainingArguments, world: int) -> tuple[int, int]:
    """(gradient accumulation steps, global batch in rows)."""
    pd = args.per_device_train_batch_size
    if args.global_batch_size:
        if args.global_batch_size % (pd * world):
            raise ValueError(f"--global_batch_size {args.global_batch_size} is not a multiple of "
                             f"per_device_train_batch_size x processes = {pd * world}")
        accum = args.global_batch_size // (pd * world)
        if args.gradient_accumulation_steps not in (None, accum):
            raise ValueError(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} contradicts "
                             f"--global_batch_size {args.global_batch_size} (which needs {accum})")
    else:
        accum = args.gradient_accumulation_steps or 1
    return accum, pd * world * accum


def init_heads_like_medusa(model: HydraModel) -> None:
    """--head_init medusa: the first block's residual of a grounded head reads c_t only (weights [I 0 ... 0],
    bias 0), so a fresh grounded head computes exactly what a fresh Medusa head computes from c_t."""
    d = model.config.hidden_size
    with torch.no_grad():
        for mlp in model.heads.mlps:
            res = mlp.blocks[0].res_connection
            if res is None:  # ungrounded: already the identity
                continue
            res.weight.zero_()
            res.weight[:, :d].copy_(torch.eye(d))
            res.bias.zero_()


def load_draft_vocab(path: str, vocab_size: int) -> torch.Tensor:
    from safetensors.torch import load_file

    ids = load_file(path).get("token_ids")
    if ids is None or ids.dim() != 1 or not len(ids) or int(ids.max()) >= vocab_size or int(ids.min()) < 0:
        raise ValueError(f"--draft_vocab {path} does not hold 1-D token_ids within the vocabulary")
    if len(torch.unique(ids)) != len(ids):
        raise ValueError(f"--draft_vocab {path} repeats token ids")
    return ids.long()


def setup(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments) -> Run:
    """Process group, model + heads, data, optimizer, feature cache; resumes from the newest checkpoint. A
    setup that fails (bad data or flags found only once the data or model are read) removes the output folder
    it created, so a corrected rerun starts clean instead of finding a half-made run."""
    d = setup_distributed(args.local_rank, args.use_cpu)
    out_dir = Path(args.output_dir)
    created = not out_dir.exists()
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial(out_dir)
    d.barrier()
    try:
        return _setup_run(model_args, data_args, args, d, out_dir)
    except BaseException:
        if created and d.is_main:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _setup_run(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments, d: Dist,
               out_dir: Path) -> Run:
    log = Logger(out_dir, d.is_main)
    if args.tf32 and d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accum, global_batch = batch_geometry(args, d.world)

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    base, tokenizer = load_base_model(model_args.model_name_or_path, dtype=dtype, device=d.device)
    if args.model_max_length > getattr(base.config, "max_position_embeddings", args.model_max_length):
        log.info(f"warning: model_max_length {args.model_max_length} > the base model's "
                 f"max_position_embeddings {base.config.max_position_embeddings}")
    train_rows, val_rows = load_or_build_rows(
        data_args.data_path, tokenizer, args.model_max_length, out_dir / "data_cache", data_args.template,
        is_main=d.is_main, barrier=d.barrier, test_size=data_args.eval_split_ratio, seed=42,
        train_on_inputs=data_args.train_on_inputs)
    if data_args.max_eval_samples is not None:
        val_rows = val_rows[:data_args.max_eval_samples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    config = HydraConfig(
        hydra_num_heads=args.hydra_num_heads, hydra_num_layers=args.hydra_num_layers,
        hydra_head_arch=args.hydra_head_arch, grounded_heads=args.grounded_heads,
        dropout_rate=args.dropout_rate,
        share_lm_head=args.share_lm_head, hidden_state_offset=args.hidden_state_offset,
        prefix_reads_next_token=args.prefix_reads_next_token, prefix_num_layers=args.prefix_num_layers,
        feature_layers=args.feature_layers,
        base_model_name_or_path=model_args.model_name_or_path or DEFAULT_BASE_MODEL,
        # continued heads decode with the tree chosen for the heads they continue, not DEFAULT_TREE's 63 nodes
        tree=ckpt.saved_tree(args.init_heads) if args.init_heads else None)
    torch.manual_seed(args.seed)  # same initial heads on every rank
    model = HydraModel(base, config, tokenizer)
    if args.head_init == "medusa":
        init_heads_like_medusa(model)
    if args.init_heads:
        ckpt.load_heads(args.init_heads, model)
    model.heads.float()  # fp32 master weights; bf16 only inside autocast
    model.train()
    vocab = None
    if args.draft_vocab:
        vocab = load_draft_vocab(args.draft_vocab, base.config.vocab_size).to(d.device)
        model.heads.set_draft_vocab(vocab)  # saved with the heads: decoding proposes from the same tokens
    params = [p for p in model.heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(model.heads, args.weight_decay), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)

    order = BatchOrder(len(train_rows), global_batch, args.seed)
    total_steps = (args.max_steps if args.max_steps > 0
                   else max(1, math.ceil(args.num_train_epochs * order.steps_per_epoch)))
    engine = None
    if args.deepspeed:
        import deepspeed

        ds_cfg = _deepspeed_config(args.deepspeed, args, accum, d.world, base.config.hidden_size)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg,
                                                       dist_init_required=d.enabled)

    cache = None
    if args.cache_hidden_states:
        all_rows = train_rows + val_rows  # val row j has id len(train_rows) + j
        cache = hidden_cache.HiddenCache(
            args.hidden_cache_dir or cache_dir() / "hidden_cache",
            hidden_cache.cache_key_parts(model_args.model_name_or_path or DEFAULT_BASE_MODEL, config,
                                         hidden_cache.weights_fingerprint(base)),
            all_rows, base.config.hidden_size,
            hidden_cache.cache_arrays(config), next(base.parameters()).dtype, create=d.is_main)
        d.barrier()
        cache.open()
        log.info(f"hidden-state cache {cache.folder} ({cache.nbytes / 2**30:.2f} GiB, "
                 f"{cache.filled()}/{len(all_rows)} rows filled)")

    if args.start_step >= total_steps:
        raise ValueError(f"--start_step {args.start_step} is past this run's {total_steps} steps")
    run = Run(args, d, log, out_dir, model, optimizer, engine, params, train_rows, val_rows, pad_id, order,
              accum, global_batch, total_steps, vocab, cache)
    if not _resume(run):  # its own newest checkpoint first: a killed branch or continuation goes on
        if args.decay_from:
            _branch(run)
        elif args.start_step:
            run.start_step = args.start_step
            # what the lost run had trained on before this step: its log's x axis goes on from there
            run.tokens_seen = sum(len(train_rows[j]["input_ids"])
                                  for step in range(args.start_step) for j in order.global_batch_rows(step))
            log.info(f"starting at step {args.start_step} of {total_steps} from {args.init_heads} "
                     f"({run.tokens_seen} tokens before it), fresh optimizer moments")
    H = config.hydra_num_heads
    log.info(f"{config.hydra_head_arch} x {H} heads, {config.hydra_num_layers} layer(s), "
             f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable params on "
             f"{base.config.name_or_path or 'base'} ({dtype}, {d.device}, {d.world} process(es)"
             f"{', deepspeed' if engine else ''}); loss over "
             f"{'the whole vocabulary' if vocab is None else f'a draft vocabulary of {len(vocab)} tokens'}")
    log.info(f"{len(train_rows)} train rows / {len(val_rows)} val rows of <= {args.model_max_length} tokens; "
             f"global batch {global_batch} = {args.per_device_train_batch_size} x {d.world} x {accum}; "
             f"{order.steps_per_epoch} steps/epoch; {total_steps} steps")
    if d.is_main:
        (out_dir / "training_args.json").write_text(json.dumps(
            {**asdict(model_args), **asdict(data_args), **asdict(args), "world_size": d.world}, indent=2))
    return run


def _resume(run: Run) -> bool:
    """Continue from the newest checkpoint in --output_dir, if there is one (then True)."""
    resume = ckpt.latest_checkpoint(run.out_dir)
    if resume is None:
        return False
    state = ckpt.read_state(resume)
    written_by_ds = (resume / ckpt.DEEPSPEED_DIR).is_dir()
    if written_by_ds != (run.engine is not None):
        raise ValueError(f"{resume} was written {'with' if written_by_ds else 'without'} --deepspeed; "
                         "resume it the same way (or use a new --output_dir)")
    if run.engine is not None:
        run.engine.load_checkpoint(str(resume / ckpt.DEEPSPEED_DIR), tag="state", load_module_strict=False)
    else:
        ckpt.load_heads(resume, run.model)
        ckpt.load_optimizer(resume, run.optimizer, run.d.device)
    run.start_step, run.tokens_seen = state["global_step"], state.get("tokens_seen", 0)
    if ("decay_start" in state) != bool(run.args.decay_from):
        raise ValueError(f"{resume} was written {'by' if 'decay_start' in state else 'without'} a cool-down "
                         "branch (--decay_from); resume it with the flags that wrote it (or use a new "
                         "--output_dir)")
    if "decay_start" in state:
        run.cool_down_from(state["decay_start"])
    if state.get("time_budgeted") and run.args.time_budget_minutes > 0:  # the budget fixed it already
        run.total_steps, run.budgeted = state["total_steps"], True
    if state.get("global_batch") != run.global_batch or state.get("total_steps") != run.total_steps:
        run.log.info(f"warning: {resume.name} was written with global batch {state.get('global_batch')} and "
                     f"{state.get('total_steps')} total steps; now {run.global_batch} and {run.total_steps}")
    run.log.truncate_after(run.start_step)
    run.log.info(f"resuming from {resume} (step {run.start_step})")
    return True


def _branch(run: Run) -> None:
    """Start a cool-down branch (--decay_from) from a checkpoint of the run this command describes."""
    src, steps = Path(run.args.decay_from), run.args.decay_steps
    if not (src / ckpt.STATE_NAME).is_file():
        raise FileNotFoundError(f"--decay_from {src}: not a checkpoint folder (no {ckpt.STATE_NAME})")
    state = ckpt.read_state(src)
    start = state["global_step"]
    if state.get("global_batch") != run.global_batch:
        raise ValueError(f"--decay_from {src} was written with global batch {state.get('global_batch')}, "
                         f"this command has {run.global_batch}: its rows would not be the run's")
    if start + steps > run.total_steps:
        raise ValueError(f"--decay_from {src} (step {start}) + --decay_steps {steps} is past this run's "
                         f"{run.total_steps} steps")
    ckpt.load_heads(src, run.model)
    ckpt.load_optimizer(src, run.optimizer, run.d.device)
    run.start_step, run.tokens_seen = start, state.get("tokens_seen", 0)
    run.cool_down_from(start)
    run.log.info(f"cool-down branch from {src} (step {start} of {run.schedule_steps}): {steps} steps, "
                 f"learning rate {run.lr(start):.2e} -> {run.lr(start + steps - 1):.2e}")


def fill_cache(run: Run) -> None:
    """Compute the missing rows of the feature cache (this rank's share), before any training step."""
    rows = list(range(run.d.rank, len(run.train_rows) + len(run.val_rows), run.d.world))
    with torch.no_grad(), autocast_ctx(run.base_amp, run.d.device):
        hidden_cache.fill(run.model, run.cache, rows, run.batch,
                          run.args.per_device_eval_batch_size or run.args.per_device_train_batch_size,
                          run.log.info)
    run.d.barrier()


def validate(run: Run, step: int) -> dict[str, float]:
    """Validation loss and per-head top-1/top-5 against the data and the teacher's argmax; logged."""
    if not run.val_rows:
        run.log.info("no validation rows; skipping evaluation")
        return {}
    d, H, model = run.d, run.model.config.hydra_num_heads, run.model
    model.eval()
    t0 = time.time()
    eb = run.args.per_device_eval_batch_size or run.args.per_device_train_batch_size
    mine = [len(run.train_rows) + r for r in range(d.rank, len(run.val_rows), d.world)]
    stats = new_stats(H, d.device)
    with torch.no_grad():
        for j in range(0, len(mine), eb):
            ids = mine[j:j + eb]
            batch = run.batch(ids)
            with autocast_ctx(run.use_amp, d.device):
                out = run.forward(ids, batch)
                _, st = hydra_loss(model, out.head_hidden, batch["labels"], batch["position_ids"],
                                   out.base_hidden, chunk_size=run.args.loss_chunk_size, topk=True,
                                   teacher_metrics=True, vocab=run.vocab, **run.loss_options)
            stats += st
    d.all_reduce(stats)
    model.train()
    m = summarize(stats, prefix="eval_", **run.loss_weights)
    heads_txt = " ".join(f"h{i}:{m.get(f'eval_head{i}_top1', float('nan')):.3f}/"
                         f"{m.get(f'eval_head{i}_top5', float('nan')):.3f}/"
                         f"{m.get(f'eval_head{i}_teacher_top1', float('nan')):.3f}" for i in range(H))
    run.log.event({"step": step, "epoch": round(run.order.epoch(step), 4), **m,
                   "tokens_seen": run.tokens_seen, "eval_seconds": time.time() - t0},
                  f"[eval] step {step} | loss {m['eval_loss']:.4f} | top1/top5/teacher_top1 {heads_txt} "
                  f"| {time.time() - t0:.1f}s")
    return m


def save(run: Run, step: int) -> None:
    d = run.d
    state = {"global_step": step, "total_steps": run.total_steps, "epoch": run.order.epoch(step),
             "tokens_seen": run.tokens_seen, "global_batch": run.global_batch, "world_size": d.world,
             "seed": run.args.seed, "time_budgeted": run.budgeted}
    if run.decay_start is not None:
        state["decay_start"] = run.decay_start
    if run.engine is not None:
        run.engine.save_checkpoint(str(ckpt.partial_dir(run.out_dir, step) / ckpt.DEEPSPEED_DIR), tag="state",
                                   exclude_frozen_parameters=True)
        d.barrier()
    if d.is_main:
        ckpt.write_checkpoint(run.out_dir, step, run.model, run.optimizer if run.engine is None else None,
                              state, keep=run.args.save_total_limit)
    d.barrier()
    run.log.info(f"saved checkpoint-{step}")


def train_step(run: Run, step: int, stats: torch.Tensor) -> tuple[float, float, int]:
    """One optimizer step over the global batch number `step`; adds the loss statistics to `stats`.
    Returns (learning rate, gradient norm, tokens in the batch)."""
    args, d, H = run.args, run.d, run.model.config.hydra_num_heads
    pd = args.per_device_train_batch_size
    torch.manual_seed(step_seed(args.seed, step, d.rank))
    rows = run.order.global_batch_rows(step)
    micro = [rows[(m * d.world + d.rank) * pd:(m * d.world + d.rank + 1) * pd] for m in range(run.accum)]
    batches = [run.batch(mb) for mb in micro]
    normalizer = sum(count_targets(b["labels"], b["position_ids"], H) for b in batches).double()
    d.all_reduce(normalizer)
    lr = run.lr(step)
    set_lr(run.optimizer, lr)
    for mb, batch in zip(micro, batches, strict=True):
        with autocast_ctx(run.use_amp, d.device):
            out = run.forward(mb, batch, args.noise_alpha)
            loss, st = hydra_loss(run.model, out.head_hidden, batch["labels"], batch["position_ids"],
                                  out.base_hidden, normalizer=normalizer, chunk_size=args.loss_chunk_size,
                                  vocab=run.vocab, **run.loss_options)
        stats += st
        if run.engine is not None:
            # The loss is normalised by the global batch's token count already; DeepSpeed averages over
            # ranks and, with scale_wrt_gas=False, does not divide by the accumulation steps.
            run.engine.backward(loss * d.world, scale_wrt_gas=False)
            # no_grad: gloo's all_gather fallback refuses in-place copies into views otherwise
            with torch.no_grad():
                run.engine.step()
        else:
            loss.backward()
        del out, loss
    grad_norm = float("nan")
    if run.engine is None:
        d.all_reduce_grads(run.params)
        if args.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.max_grad_norm).item()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    else:
        grad_norm = float(run.engine.get_global_grad_norm() or float("nan"))
    return lr, grad_norm, sum(len(run.train_rows[j]["input_ids"]) for j in rows)


def _intervals(run: Run) -> tuple[int, int]:
    """Steps between evaluations and between checkpoints (fractions of the run count on its total)."""
    return every(run.args.eval_steps, run.total_steps), every(run.args.save_steps, run.total_steps)


def fit(run: Run) -> None:
    """Train from run.start_step to run.total_steps: log, validate and checkpoint on schedule."""
    args, d, H = run.args, run.d, run.model.config.hydra_num_heads
    eval_every, save_every = _intervals(run)
    run.log.info(f"eval every {eval_every or '-'}, save every {save_every or '-'} steps")
    exit_after = int(os.environ.get(EXIT_AFTER_ENV, "0") or 0)
    started = time.time()
    if run.start_step == args.start_step and args.init_heads and eval_every:
        validate(run, run.start_step)  # where the given heads start from
    stats = new_stats(H, d.device)
    interval_tokens, interval_time, last_saved, last_eval = 0, 0.0, run.start_step, -1
    budget_at = max(args.warmup_steps, run.start_step + MIN_TIMED_STEPS)
    step = run.start_step
    while step < run.total_steps:
        t0 = time.time()
        lr, grad_norm, step_tokens = train_step(run, step, stats)
        run.tokens_seen += step_tokens
        interval_tokens += step_tokens
        interval_time += time.time() - t0
        done = step + 1
        if args.logging_steps > 0 and (done % args.logging_steps == 0
                                       or done in (run.total_steps, run.start_step + 1)):
            d.all_reduce(stats)
            m = summarize(stats, **run.loss_weights)
            tps = interval_tokens / max(interval_time, 1e-9)
            heads_txt = " ".join(f"{m.get(f'head{i}_loss', float('nan')):.3f}" for i in range(H))
            run.log.event({"step": done, "epoch": round(run.order.epoch(done), 4), **m, "lr": lr,
                           "grad_norm": grad_norm, "tokens_per_s": tps, "tokens_seen": run.tokens_seen},
                          f"step {done}/{run.total_steps} | loss {m['loss']:.4f} (heads {heads_txt}) "
                          f"| lr {lr:.2e} | grad_norm {grad_norm:.3f} | {tps:.0f} tok/s")
            stats.zero_()
            interval_tokens, interval_time = 0, 0.0
        if args.time_budget_minutes > 0 and not run.budgeted and done >= budget_at:
            fit_budget(run, done, time.time() - started)  # before this step's checkpoint, which records it
            eval_every, save_every = _intervals(run)
        if eval_every and done % eval_every == 0:
            validate(run, done)
            last_eval = done
        if save_every and done % save_every == 0:
            save(run, done)
            last_saved = done
        if exit_after and done == exit_after:
            run.log.info(f"{EXIT_AFTER_ENV}={exit_after}: exiting abruptly")
            sys.stdout.flush()
            os._exit(3)
        step = done
    final_step = max(run.start_step, run.total_steps)
    if last_eval != final_step and run.start_step < run.total_steps:
        validate(run, final_step)
    if last_saved != final_step or ckpt.latest_checkpoint(run.out_dir) is None:
        save(run, final_step)


def fit_budget(run: Run, done: int, elapsed: float) -> None:
    """Fix run.total_steps to what fits in --time_budget_minutes, from this run's rate so far (every rank
    takes the main rank's count)."""
    total = steps_within_budget(60 * run.args.time_budget_minutes, elapsed, done - run.start_step, done,
                                run.total_steps)
    count = torch.tensor([total], dtype=torch.long, device=run.d.device)
    run.d.broadcast(count)
    run.log.info(f"time budget {run.args.time_budget_minutes:g} min: {int(count)} steps instead of "
                 f"{run.total_steps} ({elapsed / max(done - run.start_step, 1):.2f} s per step so far)")
    run.total_steps, run.budgeted = int(count), True


def main(argv: list[str] | None = None) -> int:
    try:
        run = setup(*parse_args(argv))
    except (ValueError, FileNotFoundError) as e:  # bad data or flags: one line, nothing written
        print(f"[hydra] error: {e}", file=sys.stderr)
        return 2
    if run.cache is not None and run.args.fill_hidden_cache != "lazy":
        fill_cache(run)
        if run.args.fill_hidden_cache == "only":
            run.log.info(f"hidden-state cache filled: {run.cache.folder}")
            run.d.close()
            return 0
    if run.args.eval_only:
        validate(run, run.start_step)
        run.d.close()
        return 0
    fit(run)
    if run.d.is_main:
        run.model.save_pretrained(run.out_dir, dtype=torch.float32)
        run.log.info(f"done: {max(run.start_step, run.total_steps)} steps; heads saved to {run.out_dir}")
    run.d.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
