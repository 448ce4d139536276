"""export-medusa: FasterDecoding Medusa v1 and vLLM layouts, checked by re-implementing each reader's head
forward (Medusa's ResBlock stack + bias-free output layer; vLLM's ResidualBlock) on the exported tensors and
comparing with our heads' logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_base, randomize_
from safetensors.torch import load_file
from torch.nn import functional as F

from hydra.hf_utils import main as hf_main
from hydra.hf_utils import validate_folder


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    make_tiny_base(max_position_embeddings=128).save_pretrained(folder)
    return folder


def make_heads(base_folder: Path, out: Path, zero_bias: bool = True, **cfg):
    from transformers import AutoModelForCausalLM

    from hydra.model import HydraConfig, HydraModel

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    model = HydraModel(base, HydraConfig(base_model_name_or_path=str(base_folder), **cfg))
    randomize_(model.heads, seed=5, scale=0.2)
    with torch.no_grad():
        for name, p in model.heads.named_parameters():
            if zero_bias and name.startswith("lm_heads.") and name.endswith("bias"):
                p.zero_()
    model.save_pretrained(out)
    return model


def medusa_v1_logits(tensors: dict, h: int, L: int, x: torch.Tensor) -> torch.Tensor:
    for k in range(L):  # FasterDecoding ResBlock: x + SiLU(W x + b)
        x = x + F.silu(F.linear(x, tensors[f"{h}.{k}.linear.weight"], tensors[f"{h}.{k}.linear.bias"]))
    return F.linear(x, tensors[f"{h}.{L}.weight"])  # bias-free output layer


def vllm_logits(tensors: dict, cfg: dict, h: int, x: torch.Tensor) -> torch.Tensor:
    for k in range(cfg["num_hidden_layers"]):  # vLLM ResidualBlock with medusa_fc_bias
        x = x + F.silu(F.linear(x, tensors[f"blocks.{h}.layers.{k}.weight"],
                                tensors[f"blocks.{h}.layers.{k}.bias"]))
    return F.linear(x, tensors["lm_heads.0.weight" if cfg.get("original_lm_head")
                               else f"lm_heads.{h}.weight"])


@pytest.mark.parametrize("share", [False, True])
def test_medusa_v1_export_matches_our_heads(base_folder, tmp_path, share):
    model = make_heads(base_folder, tmp_path / "heads", hydra_num_heads=3, hydra_num_layers=2,
                       hydra_head_arch="mlp", share_lm_head=share)
    assert hf_main(["export-medusa", "--folder", str(tmp_path / "heads"),
                    "--out", str(tmp_path / "medusa")]) == 0
    cfg = json.loads((tmp_path / "medusa" / "config.json").read_text())
    assert cfg == {"medusa_num_heads": 3, "medusa_num_layers": 2, "base_model_name_or_path": str(base_folder)}
    tensors = load_file(str(tmp_path / "medusa" / "medusa_lm_head.safetensors"))
    assert set(tensors) == {f"{h}.{k}.linear.{p}" for h in range(3) for k in range(2)
                            for p in ("weight", "bias")} | {f"{h}.2.weight" for h in range(3)}
    x = torch.randn(5, 32)
    for h in range(3):
        ours = model.head_logits(h, model.heads.head_hidden(h, x))
        torch.testing.assert_close(medusa_v1_logits(tensors, h, 2, x), ours)
        if share:
            assert torch.equal(tensors[f"{h}.2.weight"], model.lm_head.weight)
    assert validate_folder(tmp_path / "medusa") == "medusa"
    assert "medusa" in (tmp_path / "medusa" / "README.md").read_text()


@pytest.mark.parametrize("share", [False, True])
def test_vllm_export_matches_our_heads(base_folder, tmp_path, share):
    model = make_heads(base_folder, tmp_path / "heads", hydra_num_heads=2, hydra_num_layers=1,
                       hydra_head_arch="mlp", share_lm_head=share)
    assert hf_main(["export-medusa", "--folder", str(tmp_path / "heads"), "--out", str(tmp_path / "vllm"),
                    "--format", "vllm"]) == 0
    cfg = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert cfg["model_type"] == "medusa" and cfg["medusa_fc_bias"] is True and "architectures" not in cfg
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["num_heads"],
            cfg["num_hidden_layers"]) == (32, 100, 2, 1)
    assert cfg.get("original_lm_head", False) is share
    tensors = load_file(str(tmp_path / "vllm" / "model.safetensors"))
    lm = {"lm_heads.0.weight"} if share else {"lm_heads.0.weight", "lm_heads.1.weight"}
    assert set(tensors) == {f"blocks.{h}.layers.0.{p}" for h in range(2) for p in ("weight", "bias")} | lm
    x = torch.randn(4, 32)
    for h in range(2):
        torch.testing.assert_close(vllm_logits(tensors, cfg, h, x),
                                   model.head_logits(h, model.heads.head_hidden(h, x)))
    assert validate_folder(tmp_path / "vllm") == "vllm"


def test_shared_output_layer_of_a_tied_base_model(tmp_path):
    """Tied embeddings (like SmolLM2): the checkpoint has no lm_head.weight; the embedding is the output
    layer."""
    make_tiny_base(max_position_embeddings=128, tie_word_embeddings=True).save_pretrained(tmp_path / "base")
    model = make_heads(tmp_path / "base", tmp_path / "heads", hydra_num_heads=2, hydra_head_arch="mlp")
    assert hf_main(["export-medusa", "--folder", str(tmp_path / "heads"), "--out", str(tmp_path / "o")]) == 0
    tensors = load_file(str(tmp_path / "o" / "medusa_lm_head.safetensors"))
    assert torch.equal(tensors["0.1.weight"], model.base_model.get_input_embeddings().weight)
    assert torch.equal(tensors["1.1.weight"], model.lm_head.weight)


def test_draft_vocabulary_becomes_vllm_token_map(base_folder, tmp_path):
    model = make_heads(base_folder, tmp_path / "heads", hydra_num_heads=2, hydra_head_arch="mlp",
                       share_lm_head=False)
    vocab = torch.tensor([0, 3, 5, 7, 11, 42, 99])
    model.heads.set_draft_vocab(vocab)
    model.save_pretrained(tmp_path / "heads")
    assert validate_folder(tmp_path / "heads") == "hydra"
    assert hf_main(["export-medusa", "--folder", str(tmp_path / "heads"), "--out", str(tmp_path / "v"),
                    "--format", "vllm"]) == 0
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "v" / "model.safetensors"))
    assert (cfg["truncated_vocab_size"] == 7 and cfg["vocab_size"] == 100
            and torch.equal(tensors["token_map"], vocab))
    x = torch.randn(3, 32)
    # vLLM slices each loaded lm_heads weight with token_map and scatters the logits back to the full
    # vocabulary.
    sliced = {**tensors, "lm_heads.1.weight": tensors["lm_heads.1.weight"][vocab]}
    full = model.head_logits(1, model.heads.head_hidden(1, x))
    torch.testing.assert_close(vllm_logits(sliced, cfg, 1, x), full[:, vocab])
    assert validate_folder(tmp_path / "v") == "vllm"


def test_nonzero_output_bias_is_dropped_with_a_warning(base_folder, tmp_path, capsys):
    make_heads(base_folder, tmp_path / "heads", zero_bias=False, hydra_num_heads=2, hydra_head_arch="mlp",
               share_lm_head=False)
    assert hf_main(["export-medusa", "--folder", str(tmp_path / "heads"), "--out", str(tmp_path / "o"),
                    "--dtype", "float16"]) == 0
    assert "biases" in capsys.readouterr().err
    tensors = load_file(str(tmp_path / "o" / "medusa_lm_head.safetensors"))
    assert all(v.dtype == torch.float16 for v in tensors.values()) and not any("2.bias" in k for k in tensors)


@pytest.mark.parametrize("arch", ["hydra-mlp", "prefix-mlp"])
def test_grounded_heads_are_refused(base_folder, tmp_path, arch, capsys):
    make_heads(base_folder, tmp_path / "heads", hydra_num_heads=2, hydra_head_arch=arch)
    assert hf_main(["export-medusa", "--folder", str(tmp_path / "heads"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "grounded Hydra heads" in err and "no serving engine runs grounded Hydra heads today" in err
    assert not (tmp_path / "o").exists()


def test_export_needs_a_heads_folder(tmp_path, capsys):
    assert hf_main(["export-medusa", "--folder", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "config.json" in capsys.readouterr().err
