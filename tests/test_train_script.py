"""hydra/train/train.py end to end on a tiny random Llama with the real SmolLM2 tokenizer and a tiny ShareGPT
file: a single-process run (logs, eval metrics, checkpoints, loadable heads), torchrun x2 on CPU (gloo)
matching a single process with the same global batch, kill-and-resume matching an uninterrupted run, and (if
DeepSpeed is installed) --deepspeed deepspeed.json matching the plain data-parallel run.

Subprocess runs check the files they write, not the launcher's exit code (a process may abort at exit after it
has saved everything).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hydra.model import HydraModel, load_tokenizer
from hydra.train import train
from hydra.train.checkpoint import list_checkpoints, read_state

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the cat sat on a mat and then it ran to the big red house near the river while two dogs "
         "watched from across green fields under a cloudy sky").split()


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """(model folder, data file): a 2-layer random Llama with SmolLM2's tokenizer; 40 conversations."""
    from helpers import save_tiny_model

    root = save_tiny_model(tmp_path_factory.mktemp("train_script"), context=1024)
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for i in range(40):
            conv = []
            for _ in range(rng.randint(1, 3)):
                conv.append({"from": "human", "value": " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))})
                conv.append({"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))})
            f.write(json.dumps({"id": str(i), "conversations": conv}) + "\n")
        f.write("{not json\n")  # malformed lines are skipped and counted by the data pipeline
    return root / "base", root / "data.jsonl"


def _args(model_dir, data, out, **flags) -> list[str]:
    base = {"model_name_or_path": model_dir, "data_path": data, "output_dir": out, "model_max_length": 256,
            "per_device_train_batch_size": 1, "logging_steps": 1, "learning_rate": 1e-2, "eval_steps": 0,
            "save_steps": 0, "hydra_num_heads": 3}
    base.update(flags)
    out_args = []
    for k, v in base.items():
        out_args += [f"--{k}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    return out_args


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _run(cmd: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "hydra.train.train"]


def test_single_process_run(tiny_setup, tmp_path):
    """bf16 + hydra-mlp + teacher loss: loss goes down, evals log per-head accuracies, the last 2 checkpoints
    are kept, and the final heads load with HydraModel.from_pretrained."""
    model_dir, data = tiny_setup
    out = tmp_path / "run"
    assert train.main(_args(model_dir, data, out, max_steps=6, eval_steps=3, save_steps=2, bf16=True,
                            per_device_train_batch_size=4, gradient_accumulation_steps=2,
                            lm_loss_weight=0.5, teacher_loss_weight=1.0)) == 0
    events = _events(out)
    train_ev = [e for e in events if "loss" in e]
    eval_ev = [e for e in events if "eval_loss" in e]
    assert [e["step"] for e in train_ev] == [1, 2, 3, 4, 5, 6]
    assert train_ev[-1]["loss"] < train_ev[0]["loss"]
    assert all(e["tokens_per_s"] > 0 for e in train_ev)
    assert [e["step"] for e in eval_ev] == [3, 6]
    for i in range(3):
        for key in ("top1", "top5", "teacher_top1", "teacher_top5"):
            assert 0.0 <= eval_ev[-1][f"eval_head{i}_{key}"] <= 1.0
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]
    assert read_state(out / "checkpoint-6")["global_step"] == 6
    _assert_same_weights(out, out / "checkpoint-6")
    loaded = HydraModel.from_pretrained(out, base_model=str(model_dir))
    assert loaded.config.hydra_num_heads == 3 and loaded.config.hydra_head_arch == "hydra-mlp"
    for k, v in loaded.heads.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, _weights(out)[k])
    # a finished run rerun with the same command does nothing more
    assert train.main(_args(model_dir, data, out, max_steps=6, eval_steps=3, save_steps=2, bf16=True,
                            per_device_train_batch_size=4, gradient_accumulation_steps=2,
                            lm_loss_weight=0.5, teacher_loss_weight=1.0)) == 0
    assert len(_events(out)) == len(events)


def test_torchrun_two_processes_matches_single_process(tiny_setup, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) runs 2 steps and saves loadable heads, equal to one process
    accumulating the same global batch."""
    model_dir, data = tiny_setup
    flags = dict(max_steps=2, hydra_head_arch="prefix-mlp", teacher_loss_weight=1.0, save_steps=2)
    ddp = tmp_path / "ddp"
    proc = _run(_torchrun(2) + _args(model_dir, data, ddp, **flags), timeout=240)
    assert (ddp / "model.safetensors").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert read_state(ddp / "checkpoint-2")["world_size"] == 2
    HydraModel.from_pretrained(ddp, base_model=str(model_dir))

    single = tmp_path / "single"
    assert train.main(_args(model_dir, data, single, gradient_accumulation_steps=2, **flags)) == 0
    _assert_same_weights(ddp, single, atol=1e-6)
    losses = lambda out: [e["loss"] for e in _events(out) if "loss" in e]  # noqa: E731
    # step 2's loss reads weights that agree to ~1e-6 (gloo and local accumulation sum in different orders)
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5)


def test_kill_and_resume_matches_uninterrupted(tiny_setup, tmp_path):
    """max_steps 4, save_steps 2, the process dies after step 3: rerunning the same command resumes from
    checkpoint-2 and ends at step 4 with the same weights and optimizer state as an uninterrupted run
    (dropout and embedding noise on, so the random state must be restored too)."""
    model_dir, data = tiny_setup
    flags = dict(max_steps=4, save_steps=2, dropout_rate=0.1, noise_alpha=5.0, hydra_head_arch="prefix-mlp",
                 per_device_train_batch_size=2, teacher_loss_weight=1.0)
    full = tmp_path / "full"
    assert train.main(_args(model_dir, data, full, **flags)) == 0

    resumed = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "hydra.train.train"] + _args(model_dir, data, resumed, **flags)
    proc = _run(cmd, env_extra={train.EXIT_AFTER_ENV: "3"})
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(resumed)] == [2]
    assert not (resumed / "model.safetensors").exists()
    (resumed / "checkpoint-4.partial").mkdir()  # what a kill in the middle of a save leaves behind

    assert train.main(_args(model_dir, data, resumed, **flags)) == 0
    assert not (resumed / "checkpoint-4.partial").exists()
    assert read_state(resumed / "checkpoint-4")["global_step"] == 4
    _assert_same_weights(full, resumed, atol=1e-6)
    opt_a = torch.load(full / "checkpoint-4" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(resumed / "checkpoint-4" / "optimizer.pt", weights_only=True)
    for k, state in opt_a["state"].items():
        for name, t in state.items():
            torch.testing.assert_close(t, opt_b["state"][k][name], rtol=0, atol=1e-6)
    # the log holds each step once, in order
    steps = [e["step"] for e in _events(resumed) if "loss" in e]
    assert steps == [1, 2, 3, 4]


def test_deepspeed_zero2_matches_plain(tiny_setup, tmp_path):
    pytest.importorskip("deepspeed")
    model_dir, data = tiny_setup
    flags = dict(max_steps=2, gradient_accumulation_steps=2, teacher_loss_weight=1.0, save_steps=2)
    plain = tmp_path / "plain"
    plain_flags = {**flags, "per_device_train_batch_size": 2}  # same global batch: 2 x 1 process x 2
    assert train.main(_args(model_dir, data, plain, **plain_flags)) == 0
    ds = tmp_path / "ds"
    proc = _run(_torchrun(2) + _args(model_dir, data, ds, deepspeed=REPO / "deepspeed.json", **flags),
                timeout=420)
    assert (ds / "model.safetensors").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (ds / "checkpoint-2" / "deepspeed").is_dir()
    # (different micro-batch shapes and reduction order: Adam magnifies rounding on near-zero gradients)
    _assert_same_weights(plain, ds, atol=1e-4)


@pytest.mark.parametrize("reads", [{}, {"feature_layers": [0, 1]}, {"hidden_state_offset": 1}])
def test_hidden_state_cache_matches_recomputing(tiny_setup, tmp_path, reads):
    """--cache_hidden_states over ~3 epochs (with evaluations reading cached val rows) gives the same heads as
    recomputing the base model every time; a later run on the same data reuses the same cache folder, and
    --fill_hidden_cache only completes it. Also for heads that read fused earlier layers or an earlier layer
    alone (more arrays per token)."""
    model_dir, data = tiny_setup
    flags = dict(max_steps=8, per_device_train_batch_size=4, eval_steps=4, hydra_head_arch="prefix-mlp",
                 teacher_loss_weight=1.0, bf16=True, **reads)
    plain, cached, features = tmp_path / "plain", tmp_path / "cached", tmp_path / "features"
    assert train.main(_args(model_dir, data, plain, **flags)) == 0
    cache_flags = dict(cache_hidden_states=True, hidden_cache_dir=features, **flags)
    assert train.main(_args(model_dir, data, cached, **cache_flags)) == 0
    _assert_same_weights(plain, cached, atol=1e-5)
    evals = lambda out: [e["eval_loss"] for e in _events(out) if "eval_loss" in e]  # noqa: E731
    assert evals(plain) == pytest.approx(evals(cached), rel=1e-5)
    (folder,) = features.iterdir()
    flags_file = (folder / "filled.bin").read_bytes()
    assert sum(flags_file) >= 12  # 8 steps x 4 rows cover every train row of the ~15, plus the val row(s)
    if sum(flags_file) < len(flags_file):  # some row unseen: the fill stage completes it
        assert train.main(_args(model_dir, data, tmp_path / "fill", fill_hidden_cache="only",
                                **cache_flags)) == 0
    assert features.joinpath(folder.name) == next(features.iterdir())  # still one folder: reused, not rebuilt
    assert all((folder / "filled.bin").read_bytes())
    again = tmp_path / "again"  # every row read from the cache: still the same heads
    assert train.main(_args(model_dir, data, again, fill_hidden_cache="first", **cache_flags)) == 0
    _assert_same_weights(plain, again, atol=1e-5)


@pytest.mark.parametrize("draft_vocab", [False, True])
def test_fp32_heads_on_a_bf16_base(tiny_setup, tmp_path, draft_vocab):
    """--bf16_heads False: the heads' arithmetic in fp32 on the same bf16 base and the same cached features;
    the run ends where the bf16-autocast run ends, up to bf16 rounding, without being the same run."""
    from safetensors.torch import save_file

    model_dir, data = tiny_setup
    flags = dict(max_steps=4, per_device_train_batch_size=4, eval_steps=4, hydra_head_arch="prefix-mlp",
                 teacher_loss_weight=1.0, lm_loss_weight=0.5, bf16=True, cache_hidden_states=True,
                 hidden_cache_dir=tmp_path / "features", learning_rate=1e-3)
    if draft_vocab:
        save_file({"token_ids": torch.arange(0, 2000)}, str(tmp_path / "dv.safetensors"))
        flags["draft_vocab"] = tmp_path / "dv.safetensors"
    amp, fp32 = tmp_path / "amp", tmp_path / "fp32"
    assert train.main(_args(model_dir, data, amp, **flags)) == 0
    assert train.main(_args(model_dir, data, fp32, bf16_heads=False, **flags)) == 0
    assert len(list((tmp_path / "features").iterdir())) == 1  # the same features, whatever the heads run in
    losses = {out: [e["loss"] for e in _events(out) if "loss" in e] for out in (amp, fp32)}
    assert losses[fp32] == pytest.approx(losses[amp], rel=2e-2)
    assert losses[fp32] != losses[amp]
    ev = {out: [e for e in _events(out) if "eval_loss" in e][-1]["eval_loss"] for out in (amp, fp32)}
    assert ev[fp32] == pytest.approx(ev[amp], rel=2e-2)


def test_start_step_continues_a_run_from_its_exported_heads(tiny_setup, tmp_path):
    """A run whose checkpoints are lost goes on from the heads it exported at step 2 (--init_heads,
    --start_step 2): the same rows (tokens seen) and schedule as the lost run from step 3 on, the learning
    rate warmed up again for the fresh optimizer moments, the first evaluation that of the heads it was
    given. Killed, the same command resumes from its own checkpoint, not from step 2 again."""
    model_dir, data = tiny_setup
    flags = dict(max_steps=5, warmup_steps=2, eval_steps=2, hydra_head_arch="prefix-mlp",
                 per_device_train_batch_size=2, teacher_loss_weight=1.0, lm_loss_weight=0.0)
    lost = tmp_path / "lost"
    assert train.main(_args(model_dir, data, lost, save_steps=2, save_total_limit=5, **flags)) == 0
    again = dict(init_heads=lost / "checkpoint-2", start_step=2, **flags)
    cont = tmp_path / "continued"
    assert train.main(_args(model_dir, data, cont, save_steps=1, save_total_limit=5, **again)) == 0

    steps = lambda out: {e["step"]: e for e in _events(out) if "loss" in e}  # noqa: E731
    evals = lambda out: {e["step"]: e for e in _events(out) if "eval_loss" in e}  # noqa: E731
    assert sorted(steps(cont)) == [3, 4, 5]
    seen = lambda out: [steps(out)[s]["tokens_seen"] for s in (3, 4, 5)]  # noqa: E731
    assert seen(cont) == seen(lost)
    # the lost run's learning rate, times the re-warm-up: 1/2 at step 3, then 1
    assert steps(cont)[3]["lr"] == pytest.approx(steps(lost)[3]["lr"] / 2)
    assert [steps(cont)[s]["lr"] for s in (4, 5)] == pytest.approx([steps(lost)[s]["lr"] for s in (4, 5)])
    assert sorted(evals(cont)) == [2, 4, 5]
    assert evals(cont)[2]["eval_loss"] == pytest.approx(evals(lost)[2]["eval_loss"], rel=1e-6)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hydra.train.train"] + _args(model_dir, data, killed, save_steps=1,
                                                              save_total_limit=5, **again)
    proc = _run(cmd, env_extra={train.EXIT_AFTER_ENV: "4"})
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(killed)] == [3, 4]
    assert train.main(_args(model_dir, data, killed, save_steps=1, save_total_limit=5, **again)) == 0
    assert sorted(steps(killed)) == [3, 4, 5]
    _assert_same_weights(cont, killed, atol=1e-6)


@pytest.mark.parametrize("flags, message", [
    (dict(start_step=2), "--start_step continues exported heads"),
    (dict(start_step=-1, init_heads="x"), "--start_step continues exported heads"),
    (dict(head_loss_weights=[1.0, 1.0]), "--head_loss_weights needs 3 weights >= 0"),
    (dict(head_loss_weights=[0.0, 0.0, 0.0]), "--head_loss_weights needs 3 weights >= 0"),
    (dict(head_loss_weights=[1.0, -1.0, 1.0]), "--head_loss_weights needs 3 weights >= 0"),
    (dict(teacher_temperature=0.0), "--teacher_temperature must be > 0"),
])
def test_bad_flags_stop_with_a_message_and_no_run(tiny_setup, tmp_path, capsys, flags, message):
    model_dir, data = tiny_setup
    with pytest.raises(SystemExit):
        train.main(_args(model_dir, data, tmp_path / "run", **flags))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_start_step_past_the_end_is_one_error_line(tiny_setup, tmp_path, capsys):
    model_dir, data = tiny_setup
    first = tmp_path / "first"
    assert train.main(_args(model_dir, data, first, max_steps=1)) == 0
    assert train.main(_args(model_dir, data, tmp_path / "run", max_steps=3, init_heads=first,
                            start_step=3)) == 2
    assert "--start_step 3 is past this run's 3 steps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # the failed setup left no half-made run behind


def test_failed_setup_keeps_a_folder_it_did_not_create(tiny_setup, tmp_path, capsys):
    model_dir, data = tiny_setup
    first = tmp_path / "first"
    assert train.main(_args(model_dir, data, first, max_steps=1)) == 0
    kept = sorted(p.name for p in first.iterdir())
    assert train.main(_args(model_dir, data, first, max_steps=1, init_heads=first, start_step=3)) == 2
    assert sorted(p.name for p in first.iterdir()) == kept


def test_cool_down_branch_goes_on_from_a_checkpoint_and_resumes(tiny_setup, tmp_path):
    """--decay_from checkpoint-4 --decay_steps 3: the run's rows from step 5 on (tokens seen), from its heads
    (the first step's loss is the run's own) and optimizer moments (Adam's step count goes on), with the
    learning rate of step 4 falling as 3/4, 2/4, 1/4 of it. Killed, the same command resumes the branch."""
    model_dir, data = tiny_setup
    flags = dict(max_steps=8, warmup_steps=2, per_device_train_batch_size=2, hydra_head_arch="prefix-mlp",
                 teacher_loss_weight=1.0, lm_loss_weight=0.0, lr_scheduler_type="cosine",
                 final_lr_multiplier=0.1)
    run = tmp_path / "run"
    assert train.main(_args(model_dir, data, run, save_steps=4, save_total_limit=5, **flags)) == 0
    branch_flags = dict(decay_from=run / "checkpoint-4", decay_steps=3, save_steps=1, save_total_limit=5,
                        **flags)
    branch = tmp_path / "branch"
    assert train.main(_args(model_dir, data, branch, **branch_flags)) == 0

    steps = lambda out: {e["step"]: e for e in _events(out) if "loss" in e}  # noqa: E731
    assert sorted(steps(branch)) == [5, 6, 7]
    seen = lambda out: [steps(out)[s]["tokens_seen"] for s in (5, 6, 7)]  # noqa: E731
    assert seen(branch) == seen(run)
    assert steps(branch)[5]["loss"] == pytest.approx(steps(run)[5]["loss"], rel=1e-6)
    lr4 = steps(run)[5]["lr"]  # the update of step 4 -> 5 ran at the schedule's rate of step 4
    assert [steps(branch)[s]["lr"] for s in (5, 6, 7)] == pytest.approx([lr4 * 3 / 4, lr4 * 2 / 4, lr4 / 4])
    adam_steps = lambda ckpt: {int(v["step"]) for v in torch.load(ckpt / "optimizer.pt",  # noqa: E731
                                                                    weights_only=True)["state"].values()}
    assert adam_steps(branch / "checkpoint-7") == {7}
    assert read_state(branch / "checkpoint-7")["decay_start"] == 4
    assert not (run / "checkpoint-5").exists()  # the run itself is left as it was

    # a branch killed after step 6: the same command resumes it from its own checkpoint
    shutil.rmtree(branch / "checkpoint-7")
    (branch / "model.safetensors").rename(tmp_path / "first.safetensors")
    assert train.main(_args(model_dir, data, branch, **branch_flags)) == 0
    assert [s for s, _ in list_checkpoints(branch)] == [5, 6, 7]
    assert steps(branch)[7]["lr"] == pytest.approx(lr4 / 4)
    first = load_file(str(tmp_path / "first.safetensors"))
    for k, v in _weights(branch).items():
        torch.testing.assert_close(v, first[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("flags, message", [
    (dict(decay_steps=2), "--decay_from <checkpoint> and --decay_steps N > 0 make a cool-down branch"),
    (dict(decay_from="x"), "--decay_from <checkpoint> and --decay_steps N > 0 make a cool-down branch"),
])
def test_cool_down_branch_needs_both_flags(tiny_setup, tmp_path, capsys, flags, message):
    model_dir, data = tiny_setup
    with pytest.raises(SystemExit):
        train.main(_args(model_dir, data, tmp_path / "branch", **flags))
    assert message in capsys.readouterr().err


def test_cool_down_branch_errors_are_one_line_and_leave_nothing(tiny_setup, tmp_path, capsys):
    model_dir, data = tiny_setup
    run = tmp_path / "run"
    assert train.main(_args(model_dir, data, run, max_steps=3, save_steps=2)) == 0
    for flags, message in [
        (dict(decay_from=run, decay_steps=1), "not a checkpoint folder"),
        (dict(decay_from=run / "checkpoint-2", decay_steps=2),
         "(step 2) + --decay_steps 2 is past this run's 3 steps"),
        (dict(decay_from=run / "checkpoint-2", decay_steps=1, per_device_train_batch_size=2),
         "global batch 1, this command has 2"),
    ]:
        assert train.main(_args(model_dir, data, tmp_path / "branch", max_steps=3, **flags)) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "branch").exists()
    # a branch's folder resumed without its flags, and a run's folder resumed as a branch
    branch = dict(decay_from=run / "checkpoint-2", decay_steps=1)
    assert train.main(_args(model_dir, data, tmp_path / "branch", max_steps=3, **branch)) == 0
    assert train.main(_args(model_dir, data, tmp_path / "branch", max_steps=3)) == 2
    assert "was written by a cool-down branch" in capsys.readouterr().err
    assert train.main(_args(model_dir, data, run, max_steps=3, **branch)) == 2
    assert "was written without a cool-down branch" in capsys.readouterr().err


def _continue_with_option(tiny_setup, tmp_path, new_weights: str, **option):
    """Train Hydra++ heads without `option`, then continue them with it (--init_heads). The option's weights
    (names starting with `new_weights`) start as a no-op, so the second run's first evaluation equals the
    first run's last; its last differs (training moved them). Returns (second run's weights, its loaded
    model)."""
    model_dir, data = tiny_setup
    flags = dict(max_steps=3, per_device_train_batch_size=4, eval_steps=3, hydra_head_arch="prefix-mlp",
                 teacher_loss_weight=1.0, lm_loss_weight=0.0)
    first, second = tmp_path / "first", tmp_path / "second"
    assert train.main(_args(model_dir, data, first, **flags)) == 0
    assert not any(k.startswith(new_weights) for k in _weights(first))
    assert train.main(_args(model_dir, data, second, init_heads=first, **option, **flags)) == 0
    evals = lambda out: [e for e in _events(out) if "eval_loss" in e]  # noqa: E731
    assert evals(second)[0]["step"] == 0
    assert evals(second)[0]["eval_loss"] == pytest.approx(evals(first)[-1]["eval_loss"], rel=1e-6)
    assert evals(second)[-1]["eval_loss"] != evals(first)[-1]["eval_loss"]
    return _weights(second), HydraModel.from_pretrained(second, base_model=str(model_dir))


def test_prefix_reads_next_token_continues_heads_saved_without_it(tiny_setup, tmp_path):
    """--prefix_reads_next_token from heads that lack it: W starts at zero; training moves it."""
    weights, model = _continue_with_option(tiny_setup, tmp_path, "prefix.next_token_proj.",
                                           prefix_reads_next_token=True)
    assert weights["prefix.next_token_proj.weight"].abs().max() > 0
    assert model.config.prefix_reads_next_token and model.heads.context_reads_next_token


def test_prefix_num_layers_continues_heads_with_fewer(tiny_setup, tmp_path):
    """--prefix_num_layers 2 from one-layer heads: the new layer starts as the identity; training moves its
    output projections off zero."""
    weights, model = _continue_with_option(tiny_setup, tmp_path, "prefix.extra_layers.", prefix_num_layers=2)
    assert weights["prefix.extra_layers.0.self_attn.o_proj.weight"].abs().max() > 0
    assert weights["prefix.extra_layers.0.mlp.down_proj.weight"].abs().max() > 0
    assert model.config.prefix_num_layers == 2 and len(model.heads.prefix.extra_layers) == 1


def test_feature_layers_continue_heads_saved_without_them(tiny_setup, tmp_path):
    """--feature_layers from heads that read the final hidden state alone: fusion starts as [I | 0]; training
    moves the earlier layers' columns off zero."""
    weights, model = _continue_with_option(tiny_setup, tmp_path, "fuse.", feature_layers=[0, 1])
    d = weights["prefix.layer.self_attn.o_proj.weight"].shape[0]
    assert weights["fuse.proj.weight"][:, d:].abs().max() > 0
    assert model.config.feature_layers == [0, 1] and model.heads.fuse is not None


def test_prefix_reads_next_token_needs_a_prefix_layer(tiny_setup, tmp_path, capsys):
    model_dir, data = tiny_setup
    with pytest.raises(SystemExit):
        train.main(_args(model_dir, data, tmp_path / "run", hydra_head_arch="hydra-mlp",
                         prefix_reads_next_token=True))
    assert "--prefix_reads_next_token needs --hydra_head_arch prefix-mlp" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_draft_vocab_run_saves_its_vocabulary(tiny_setup, tmp_path):
    """--draft_vocab trains over those tokens only, logs comparable accuracies and ships the vocabulary."""
    from safetensors.torch import save_file

    model_dir, data = tiny_setup
    vocab = torch.tensor(sorted(set(load_tokenizer(None)(" ".join(WORDS))["input_ids"]))[:20])
    save_file({"token_ids": vocab}, str(tmp_path / "dv.safetensors"))
    out = tmp_path / "run"
    assert train.main(_args(model_dir, data, out, max_steps=3, eval_steps=3, teacher_loss_weight=1.0,
                            lm_loss_weight=1.0, draft_vocab=tmp_path / "dv.safetensors")) == 0
    assert torch.equal(load_file(str(out / "draft_vocab.safetensors"))["token_ids"], vocab)
    ev = [e for e in _events(out) if "eval_loss" in e][-1]
    for i in range(3):
        assert 0.0 <= ev[f"eval_head{i}_top1"] <= ev[f"eval_head{i}_top5"] <= 1.0
        assert 0.0 <= ev[f"eval_head{i}_teacher_top1"] <= 1.0
    model = HydraModel.from_pretrained(out, base_model=str(model_dir))
    assert torch.equal(model.heads.draft_vocab, vocab)


def test_single_conversation_file_is_one_clear_error(tiny_setup, tmp_path, capsys):
    model_dir, data = tiny_setup
    one = tmp_path / "one.jsonl"
    one.write_text(data.read_text().splitlines()[0] + "\n")
    assert train.main(_args(model_dir, one, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[hydra]")]  # (others: loading progress)
    assert len(lines) == 1 and lines[0].startswith("[hydra] error:") and "1 conversation" in lines[0], err
    assert "Traceback" not in err
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_paths_expand_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    model_args, data_args, args = train.parse_args(
        ["--data_path", "~/d.jsonl", "--output_dir", "~/out", "--model_name_or_path", "~/m",
         "--draft_vocab", "~/v.safetensors", "--hidden_cache_dir", "~/f", "--init_heads", "~/h"])
    assert data_args.data_path == str(tmp_path / "d.jsonl") and args.output_dir == str(tmp_path / "out")
    assert model_args.model_name_or_path == str(tmp_path / "m")
    assert (args.draft_vocab == str(tmp_path / "v.safetensors")
            and args.hidden_cache_dir == str(tmp_path / "f"))
    assert args.init_heads == str(tmp_path / "h")


def test_pipeline_stage_markers(tmp_path):
    """run_stages: a stage runs until it succeeds once, then is skipped; a failed stage stops the run without
    a marker, and the next run starts at it (not before it)."""
    from hydra.train.pipeline import Stage, run_stages

    calls = tmp_path / "calls.txt"

    def stage(name: str, fail_flag: Path | None = None) -> Stage:
        code = (f"import pathlib, sys; pathlib.Path({str(calls)!r}).open('a').write({name!r} + '\\n'); "
                f"sys.exit(3 if {fail_flag is not None} and pathlib.Path({str(fail_flag)!r}).exists() "
                "else 0)")
        return Stage(name, [sys.executable, "-c", code], work=1.0)

    flag = tmp_path / "fail"
    flag.touch()
    todo = [stage("a"), stage("b", flag), stage("c")]
    lines: list[str] = []
    assert run_stages(todo, tmp_path / "w", "cpu", log=lines.append) == 3
    assert calls.read_text().split() == ["a", "b"]
    assert any("stage b failed" in line for line in lines)
    flag.unlink()
    assert run_stages(todo, tmp_path / "w", "cpu", log=lines.append) == 0
    assert calls.read_text().split() == ["a", "b", "b", "c"]
    assert run_stages(todo, tmp_path / "w", "cpu", log=lines.append) == 0
    assert calls.read_text().split() == ["a", "b", "b", "c"]
    assert json.loads((tmp_path / "w" / "state.json").read_text())["rates"].keys() == {"a", "b", "c"}


@pytest.mark.parametrize(("flag", "native_bf16", "bf16"), [
    ([], True, "True"), ([], False, "False"), (["--train-dtype", "float32"], True, "False"),
    (["--train-dtype", "bfloat16"], False, "True"),
])
def test_pipeline_train_dtype(tmp_path, monkeypatch, flag, native_bf16, bf16):
    """--train-dtype reaches the feature and train stages as train.py's --bf16, the distillation and the
    MT-Bench stage as their dtype; by default bf16 where the CPU computes it natively, else fp32."""
    from hydra.train.pipeline import parse_args, stages

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    todo = stages(parse_args(["--workdir", str(tmp_path), *flag]))
    by_name = {s.name: s.cmd for s in todo}
    dtype = "bfloat16" if bf16 == "True" else "float32"
    assert by_name["distill"][by_name["distill"].index("--dtype") + 1] == dtype
    assert next(s for s in todo if s.name == "mtbench").env["DTYPE"] == dtype
    for name in ("features", "train"):
        cmd = by_name[name]
        assert cmd[cmd.index("--bf16") + 1] == bf16
        assert not {"--prefix_reads_next_token", "--prefix_num_layers", "--feature_layers",
                    "--time_budget_minutes"} & set(cmd)


def test_pipeline_prefix_options(tmp_path):
    from hydra.train.pipeline import parse_args, stages

    argv = ["--workdir", str(tmp_path), "--prefix-reads-next-token", "--prefix-num-layers", "2",
            "--feature-layers", "2", "15", "--time-budget", "6.5"]
    cmd = {s.name: s.cmd for s in stages(parse_args(argv))}["train"]
    assert cmd[cmd.index("--time_budget_minutes") + 1] == "6.5"
    assert cmd[cmd.index("--prefix_reads_next_token") + 1] == "True"
    assert cmd[cmd.index("--prefix_num_layers") + 1] == "2"
    i = cmd.index("--feature_layers")
    assert cmd[i + 1:i + 3] == ["2", "15"]


def test_pipeline_several_data_files(tmp_path):
    """--data A B: no distillation, the split draws its validation chats from A and adds B to training only
    (partition_train_test --extra-train); the time estimate counts both files' conversations."""
    import gzip

    from hydra.train.pipeline import count_conversations, parse_args, stages

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    a.write_text('{"id": 1}\n' * 3)
    with gzip.open(b, "wt") as f:
        f.write('{"id": 2}\n' * 5)
    assert count_conversations([str(a), str(b), str(tmp_path / "missing.jsonl")]) == 8
    todo = {s.name: s
            for s in stages(parse_args(["--workdir", str(tmp_path / "w"), "--data", str(a), str(b)]))}
    assert "distill" not in todo
    cmd = todo["split"].cmd
    assert cmd[cmd.index("--input") + 1] == str(a)
    assert cmd[cmd.index("--extra-train") + 1:] == [str(b)]
    assert todo["split"].work == 8
    one = {s.name: s for s in stages(parse_args(["--workdir", str(tmp_path / "w"), "--data", str(a)]))}
    assert "--extra-train" not in one["split"].cmd


def test_pipeline_sampled_passes(tmp_path):
    """--sampled-passes 2: two sampled distillations (seeds 1 and 2) that go to training only, after any
    given extra files; their time estimate shares one measured rate."""
    from hydra.train.pipeline import parse_args, run_stages, stages

    w = tmp_path / "w"
    todo = stages(parse_args(["--workdir", str(w), "--sampled-passes", "2"]))
    assert [s.name for s in todo][:4] == ["distill", "sample1", "sample2", "split"]
    for k in (1, 2):
        cmd = todo[k].cmd
        assert cmd[cmd.index("--output") + 1] == str(w / f"sampled_s{k}.jsonl")
        sampling = [cmd[cmd.index(f) + 1] for f in ("--temperature", "--top-p", "--seed")]
        assert sampling == ["0.7", "0.95", str(k)]
    assert todo[0].cmd[todo[0].cmd.index("--temperature") + 1] == "0"
    split = todo[3].cmd
    assert split[split.index("--extra-train") + 1:] == [str(w / f"sampled_s{k}.jsonl") for k in (1, 2)]
    given = stages(parse_args(["--workdir", str(w), "--sampled-passes", "1", "--data", "a.jsonl", "b.jsonl"]))
    split = next(s for s in given if s.name == "split").cmd
    assert split[split.index("--extra-train") + 1:] == ["b.jsonl", str(w / "sampled_s1.jsonl")]

    (w / ".done").mkdir(parents=True)
    (w / "state.json").write_text(json.dumps({"rates": {"sample": 2.0}}))
    lines = []
    run_stages(todo[2:3], w, "cpu", dry_run=True, log=lines.append)
    assert "sample2: ~3.5 h" in lines[0] and "all stages left: ~3.5 h" in lines[0]  # 25,323 prompts at 2/s


def test_pipeline_sampled_pass_starts_from_the_committed_replies(tmp_path):
    """sample1 starts from data/self_distill_smollm2_sampled_s1.jsonl.gz (the same prompts and sampling
    settings) when its output does not exist yet or is empty, and its time estimate counts only the prompts
    left; not for another base model, nor over an output with chats in it, nor for a pass with no committed
    file."""
    from hydra.train.pipeline import REPO, Stage, count_conversations, parse_args, run_stages, stages

    committed = REPO / "data" / "self_distill_smollm2_sampled_s1.jsonl.gz"
    w = tmp_path / "w"
    todo = stages(parse_args(["--workdir", str(w), "--sampled-passes", "2"]))
    assert todo[1].starts_from == (committed, w / "sampled_s1.jsonl") and todo[2].starts_from is None
    assert todo[1].work == 25_323 - count_conversations([str(committed)]) and todo[2].work == 25_323
    other = stages(parse_args(["--workdir", str(w), "--sampled-passes", "1", "--base-model", "x/y"]))
    assert other[1].starts_from is None

    source = tmp_path / "given.jsonl.gz"
    with gzip.open(source, "wt") as f:
        f.write('{"id": "a"}\n{"id": "b"}\n')
    out = w / "sampled_s1.jsonl"
    code = "import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.write_text(p.read_text() + 'c\\n')"
    stage = Stage("sample1", [sys.executable, "-c", code, str(out)], 1.0, starts_from=(source, out))
    lines: list[str] = []
    assert run_stages([stage], w, "cpu", dry_run=True, log=lines.append) == 0 and not out.exists()
    out.parent.mkdir(parents=True)
    out.touch()  # what a distillation killed before its first batch leaves
    assert run_stages([stage], w, "cpu", log=lines.append) == 0
    assert out.read_text().splitlines() == ['{"id": "a"}', '{"id": "b"}', "c"]
    assert "sample1: starting from the committed" in lines[-1] and not list(w.glob("*.partial"))
    (w / ".done" / "sample1").unlink()  # run again: the output exists, so it is resumed, not replaced
    assert run_stages([stage], w, "cpu", log=lines.append) == 0
    assert out.read_text().splitlines()[2:] == ["c", "c"]
    resumed = stages(parse_args(["--workdir", str(w), "--sampled-passes", "1"]))[1]
    assert resumed.work == 25_323 - 4  # the output's chats are answered, the committed file's are not counted


@pytest.mark.slow
def test_pipeline_skips_done_stages_and_resumes_a_killed_one(tiny_setup, tmp_path):
    """scripts/train_default_heads.sh on a tiny configuration (split -> features -> train): the train stage is
    killed after step 2, so it gets no marker; the rerun skips split and features and resumes training from
    checkpoint-2 instead of starting over; a third run does nothing."""
    from safetensors.torch import save_file

    model_dir, data = tiny_setup
    save_file({"token_ids": torch.arange(0, 2000)}, str(tmp_path / "dv.safetensors"))
    argv = [str(REPO / "scripts" / "train_default_heads.sh"), "--workdir", str(tmp_path / "w"),
            "--data", str(data), "--base-model", str(model_dir),
            "--draft-vocab", str(tmp_path / "dv.safetensors"), "--epochs", "3", "--rows", "4",
            "--max-length", "256", "--save-steps", "1", "--skip", "tree", "mtbench"]
    env = {**os.environ, "PY": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                           env={**env, train.EXIT_AFTER_ENV: "2"})
    assert first.returncode != 0 and "stage train failed" in first.stdout, (
        first.stdout[-2000:] + first.stderr[-2000:])
    done = tmp_path / "w" / ".done"
    assert sorted(p.name for p in done.iterdir()) == ["features", "split"]
    heads = tmp_path / "w" / "heads"
    assert [s for s, _ in list_checkpoints(heads)][-1] == 2
    second = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "split: done, skipped" in second.stdout and "features: done, skipped" in second.stdout
    assert "resuming from" in second.stdout and "checkpoint-2" in second.stdout
    assert (heads / "model.safetensors").is_file() and (done / "train").is_file()
    third = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert third.returncode == 0 and third.stdout.count("done, skipped") == 3, third.stdout


def test_feature_cache_key_follows_the_base_weights():
    """The shared feature cache is keyed by the base weights too: the same model gives the same key, a model
    changed at the same name (re-converted, fine-tuned) gets a new cache instead of stale hidden states."""
    from helpers import make_tiny_base

    from hydra.model import HydraConfig
    from hydra.train.hidden_cache import cache_key_parts, weights_fingerprint

    config = HydraConfig()
    a, b = make_tiny_base(seed=0), make_tiny_base(seed=0)
    key = cache_key_parts("same/name", config, weights_fingerprint(a))
    assert key == cache_key_parts("same/name", config, weights_fingerprint(b))
    assert set(key) == {"model", "weights", "offset"}  # fused features get their own folder
    assert key != cache_key_parts("same/name", HydraConfig(feature_layers=[0]), weights_fingerprint(a))
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    assert key != cache_key_parts("same/name", config, weights_fingerprint(b))


def test_feature_cache_key_of_a_large_weight():
    """A weight as large as the default model's embedding (49,152 x 576 entries): the sampled indices stay in
    range (a float32 linspace rounded the last one past the end) and include the last entry."""
    from hydra.train.hidden_cache import weights_fingerprint

    big = torch.nn.Embedding(49_152, 576)
    key = weights_fingerprint(big)
    with torch.no_grad():
        big.weight.view(-1)[-1] += 1.0
    assert weights_fingerprint(big) != key


def test_steps_within_budget():
    from hydra.train.schedule import steps_within_budget

    # 4 steps took 40 s: 10 s per step, 100 s left of a 140 s budget -> 10 more steps
    assert steps_within_budget(140.0, 40.0, 4, done=4, planned=100) == 14
    assert steps_within_budget(1e6, 40.0, 4, done=4, planned=100) == 100  # never more than planned
    assert steps_within_budget(10.0, 40.0, 4, done=4, planned=100) == 4  # over budget already: stop here
    assert steps_within_budget(140.0, 40.0, 4, done=10, planned=100) == 20  # counted from the steps done
    assert steps_within_budget(140.0, 0.0, 0, done=0, planned=100) == 100  # nothing timed: the plan


def test_time_budget_fixes_the_step_count_after_the_warm_up_and_a_resume_keeps_it(tiny_setup, tmp_path):
    """A budget already spent at the end of the warm-up stops the run there, with the schedule's total and
    the saved state saying so; a rerun with the same flags resumes nothing (the count is kept). A budget that
    fits everything changes nothing."""
    model_dir, data = tiny_setup
    out = tmp_path / "short"
    flags = dict(max_steps=12, warmup_steps=4, eval_steps=0, save_steps=2)
    assert train.main(_args(model_dir, data, out, time_budget_minutes=1e-6, **flags)) == 0
    state = read_state(list_checkpoints(out)[-1][1])
    assert state["global_step"] == 4 and state["total_steps"] == 4 and state["time_budgeted"] is True
    assert train.main(_args(model_dir, data, out, time_budget_minutes=1e-6, **flags)) == 0
    assert [s for s, _ in list_checkpoints(out)][-1] == 4
    long = tmp_path / "long"
    assert train.main(_args(model_dir, data, long, time_budget_minutes=1e3, **flags)) == 0
    state = read_state(list_checkpoints(long)[-1][1])
    assert state["global_step"] == 12 and state["total_steps"] == 12 and state["time_budgeted"] is True


def test_continued_heads_keep_the_tree_of_the_heads_they_continue(tiny_setup, tmp_path):
    """Heads trained with --init_heads name the tree their init named (chosen for those heads), not None,
    which would make them decode with DEFAULT_TREE; fresh heads name none."""
    model_dir, data = tiny_setup
    first, second = tmp_path / "first", tmp_path / "second"
    assert train.main(_args(model_dir, data, first, max_steps=1)) == 0
    config = json.loads((first / "config.json").read_text())
    assert config["tree"] is None
    (first / "config.json").write_text(json.dumps({**config, "tree": "tree_8"}))
    assert train.main(_args(model_dir, data, second, max_steps=1, init_heads=first)) == 0
    assert json.loads((second / "config.json").read_text())["tree"] == "tree_8"
