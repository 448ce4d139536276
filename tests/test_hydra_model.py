"""hydra/model/hydra_model.py, config.py, legacy.py: save/load, clear load errors, the original format."""

from __future__ import annotations

import copy
import json
import pathlib

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaModel

from hydra.model import HEAD_ARCHS, HydraConfig, HydraModel

H = 3
SEQ = 10


def _model(base, arch, randomize, share_lm_head=True, num_layers=2, seed=1, **cfg):
    config = HydraConfig(
        hydra_num_heads=H,
        hydra_num_layers=num_layers,
        hydra_head_arch=arch,
        share_lm_head=share_lm_head,
        base_model_name_or_path="tiny-random-llama",
        **cfg,
    )
    model = HydraModel(base, config)
    randomize(model.heads, seed=seed)
    return model.eval()


def _ids(vocab, seed=0, batch=2):
    return torch.randint(0, vocab, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _all_logits(model, ids):
    with torch.no_grad():
        out = model(ids)
        return torch.stack(
            [model.head_logits(i, out.head_hidden[i]) for i in range(model.config.hydra_num_heads)]
        )


def _saved(tmp_path, base, randomize, arch="hydra-mlp", **kw):
    model = _model(base, arch, randomize, **kw)
    folder = tmp_path / "heads"
    model.save_pretrained(folder)
    return model, folder


# --- config ----------------------------------------------------------------------------------------------
def test_config_defaults_and_aliases():
    assert HEAD_ARCHS == ("mlp", "hydra-mlp", "prefix-mlp")
    assert HydraConfig(hydra_head_arch="mlp").grounded_heads is False
    assert HydraConfig(hydra_head_arch="hydra-mlp").grounded_heads is True
    assert HydraConfig(hydra_head_arch="prefix-mlp").grounded_heads is True
    legacy = HydraConfig(hydra_head_arch="mlp", grounded_heads=True)  # the original release's spelling
    assert legacy.hydra_head_arch == "hydra-mlp"
    with pytest.raises(ValueError, match="hydra_head_arch"):
        HydraConfig(hydra_head_arch="cross-attn")
    with pytest.raises(ValueError, match="grounded_heads"):
        HydraConfig(hydra_head_arch="prefix-mlp", grounded_heads=False)
    with pytest.raises(ValueError, match="hydra_num_heads"):
        HydraConfig(hydra_num_heads=0)
    with pytest.raises(ValueError, match="dropout_rate"):
        HydraConfig(dropout_rate=1.0)


# --- save / load round trip --------------------------------------------------------------------------------
@pytest.mark.parametrize("share_lm_head", [True, False])
@pytest.mark.parametrize("arch", HEAD_ARCHS)
def test_round_trip_bit_exact(tmp_path, tiny_base, randomize, arch, share_lm_head):
    model, folder = _saved(
        tmp_path, tiny_base, randomize, arch, share_lm_head=share_lm_head, dropout_rate=0.1
    )
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = HydraModel.from_pretrained(folder, base_model=tiny_base)
    assert loaded.base_model is tiny_base
    for field in (
        "hydra_num_heads",
        "hydra_num_layers",
        "hydra_head_arch",
        "grounded_heads",
        "dropout_rate",
        "share_lm_head",
        "base_model_name_or_path",
        "hidden_state_offset",
        "hidden_size",
        "vocab_size",
    ):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    want, got = model.heads.state_dict(), loaded.heads.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    loaded.eval()
    ids = _ids(tiny_base.config.vocab_size)
    assert torch.equal(_all_logits(loaded, ids), _all_logits(model, ids))


@pytest.mark.parametrize("share_lm_head", [True, False])
@pytest.mark.parametrize("arch", HEAD_ARCHS)
def test_saved_file_holds_head_weights_only(tmp_path, tiny_base, randomize, arch, share_lm_head):
    model, folder = _saved(tmp_path, tiny_base, randomize, arch, share_lm_head=share_lm_head)
    weights = folder / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert keys == set(model.heads.state_dict())
    base_keys = set(tiny_base.state_dict())
    assert not keys & base_keys
    assert not any(
        k.startswith(("model.", "base_model", "embed_tokens", "input_embed_fn", "lm_head."))
        or "embed_tokens" in k
        for k in keys
    )
    vocab = tiny_base.config.vocab_size
    vocab_sized = [k for k, s in shapes.items() if vocab in s]
    assert bool(vocab_sized) == (not share_lm_head)
    assert all(k.startswith("lm_heads.") for k in vocab_sized)
    head_bytes = sum(v.numel() * v.element_size() for v in model.heads.state_dict().values())
    assert head_bytes <= weights.stat().st_size <= head_bytes + 16_384  # tensors + a small JSON header


def test_save_in_bfloat16(tmp_path, tiny_base, randomize):
    model = _model(tiny_base, "prefix-mlp", randomize, share_lm_head=False)
    model.save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    loaded = HydraModel.from_pretrained(tmp_path / "bf16", base_model=tiny_base)
    for k, v in model.heads.state_dict().items():
        assert torch.equal(loaded.heads.state_dict()[k], v.to(torch.bfloat16).to(v.dtype)), k


def test_round_trip_twice_is_stable(tmp_path, tiny_base, randomize):
    _, folder = _saved(tmp_path, tiny_base, randomize, "prefix-mlp")
    loaded = HydraModel.from_pretrained(folder, base_model=tiny_base)
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        folder / "model.safetensors"
    ).read_bytes()


def test_loads_base_model_from_folder(tmp_path, tiny_base, randomize):
    """base_model as a folder (or as the config's base_model_name_or_path) loads a frozen base + tokenizer."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    # written by hand: PreTrainedModel.save_pretrained imports accelerate/deepspeed, which alone takes seconds
    save_file(
        {k: v.contiguous() for k, v in tiny_base.state_dict().items()},
        str(base_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    tiny_base.config.save_pretrained(base_dir)
    vocab = {f"t{i}": i for i in range(tiny_base.config.vocab_size)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0"
    )
    tok.save_pretrained(base_dir)
    model, folder = _saved(tmp_path, tiny_base, randomize, "hydra-mlp")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (folder / "config.json").write_text(json.dumps(cfg))
    for base_arg in (None, str(base_dir)):
        loaded = HydraModel.from_pretrained(folder, base_model=base_arg)
        assert loaded.tokenizer is not None
        assert not any(p.requires_grad for p in loaded.base_model.parameters())
        assert not loaded.base_model.training
        ids = _ids(tiny_base.config.vocab_size)
        assert torch.equal(_all_logits(loaded.eval(), ids), _all_logits(model, ids))


# --- clear errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,other", [("hidden_size", dict(hidden_size=48)), ("vocab_size", dict(vocab_size=80))]
)
def test_mismatched_base_model(tmp_path, tiny_base, tiny_base_factory, randomize, field, other):
    _, folder = _saved(tmp_path, tiny_base, randomize, "hydra-mlp", share_lm_head=False)
    wrong = tiny_base_factory(**other)
    with pytest.raises(ValueError, match=field):
        HydraModel.from_pretrained(folder, base_model=wrong)


@pytest.mark.parametrize("other", [dict(hidden_size=48), dict(vocab_size=80)])
def test_mismatched_base_model_without_recorded_sizes(
    tmp_path, tiny_base, tiny_base_factory, randomize, other
):
    """A config without hidden_size / vocab_size (e.g. a hand-written one) still fails with a clear error."""
    _, folder = _saved(tmp_path, tiny_base, randomize, "prefix-mlp", share_lm_head=False)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"], cfg["vocab_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not fit this base model"):
        HydraModel.from_pretrained(folder, base_model=tiny_base_factory(**other))


def test_missing_folder(tmp_path, tiny_base):
    missing = tmp_path / "no-such-heads"
    with pytest.raises(FileNotFoundError, match="no-such-heads"):
        HydraModel.from_pretrained(missing, base_model=tiny_base)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HydraModel.from_pretrained("./no/such/heads", base_model=tiny_base)


def test_missing_config(tmp_path, tiny_base, randomize):
    _, folder = _saved(tmp_path, tiny_base, randomize)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        HydraModel.from_pretrained(folder, base_model=tiny_base)


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        ("[1, 2, 3]", "not a Hydra heads config"),
        ('{"model_type": "llama", "hidden_size": 32}', "not a Hydra heads config"),
    ],
)
def test_corrupt_config(tmp_path, tiny_base, randomize, content, message):
    _, folder = _saved(tmp_path, tiny_base, randomize)
    path = folder / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message) as err:
        HydraModel.from_pretrained(folder, base_model=tiny_base)
    assert str(path) in str(err.value)


def test_unknown_head_arch(tmp_path, tiny_base, randomize):
    _, folder = _saved(tmp_path, tiny_base, randomize)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hydra_head_arch"] = "cross-attn"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"hydra_head_arch 'cross-attn'"):
        HydraModel.from_pretrained(folder, base_model=tiny_base)


def test_missing_weights(tmp_path, tiny_base, randomize):
    _, folder = _saved(tmp_path, tiny_base, randomize)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        HydraModel.from_pretrained(folder, base_model=tiny_base)


@pytest.mark.parametrize(
    "garbage",
    [b"", b"garbage bytes, not a safetensors file" * 10, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......"],
)
def test_corrupt_weights(tmp_path, tiny_base, randomize, garbage):
    _, folder = _saved(tmp_path, tiny_base, randomize)
    (folder / "model.safetensors").write_bytes(garbage)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        HydraModel.from_pretrained(folder, base_model=tiny_base)


def test_truncated_weights(tmp_path, tiny_base, randomize):
    _, folder = _saved(tmp_path, tiny_base, randomize)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        HydraModel.from_pretrained(folder, base_model=tiny_base)


def test_weights_that_do_not_match_config(tmp_path, tiny_base, randomize):
    """config.json says prefix-mlp but the weights are hydra-mlp heads (e.g. files mixed up by hand)."""
    _, folder = _saved(tmp_path, tiny_base, randomize, "hydra-mlp")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hydra_head_arch"] = "prefix-mlp"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match their config.json"):
        HydraModel.from_pretrained(folder, base_model=tiny_base)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No Hub access and an empty Hub cache, whatever the machine has."""
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_unreachable_hub_id(tiny_base, offline_hub):
    with pytest.raises(FileNotFoundError, match="nonexistent-user/nonexistent-heads") as err:
        HydraModel.from_pretrained("nonexistent-user/nonexistent-heads", base_model=tiny_base)
    assert "Hub" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained deep traceback


def test_unreachable_base_model_hub_id(tmp_path, tiny_base, randomize, offline_hub):
    _, folder = _saved(tmp_path, tiny_base, randomize)
    with pytest.raises(OSError, match="nonexistent-user/nonexistent-model") as err:
        HydraModel.from_pretrained(folder, base_model="nonexistent-user/nonexistent-model")
    assert "not a local folder" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


# --- the original release format (config.json + pickled hydra_lm_head.pt) --------------------------------
# A small re-implementation of the original module structure, so the test can write a checkpoint exactly as
# the original code's `torch.save(hydra_head.state_dict(), "hydra_lm_head.pt")` did, and compute its outputs.
class OrigResBlock(nn.Module):
    def __init__(self, hidden_size, num_condition=0):
        super().__init__()
        self.linear = nn.Linear(hidden_size * (num_condition + 1), hidden_size)
        if num_condition > 0:
            self.res_connection = nn.Linear(hidden_size * (num_condition + 1), hidden_size)
        else:
            self.res_connection = nn.Identity()
        torch.nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.res_connection(x) + self.act(self.linear(x))


class OrigHydraMLP(nn.Module):
    """arch "mlp" with grounded_heads=True (the paper's Hydra heads)."""

    def __init__(self, num_layers, num_heads, input_embed_fn, base_config, lm_head_init_weight):
        super().__init__()
        d, vocab = base_config.hidden_size, base_config.vocab_size
        self.num_heads = num_heads
        self.input_embed_fn = (
            input_embed_fn  # registered as a submodule: its weight ends up in the state dict
        )
        # `[OrigResBlock(d)] * (n - 1)` repeats ONE module: blocks 2..n of a head share weights (issue #8).
        self.hydra_mlp = nn.ModuleList(
            [
                nn.Sequential(OrigResBlock(d, i + 1), *([OrigResBlock(d)] * (num_layers - 1)))
                for i in range(num_heads)
            ]
        )
        self.hydra_lm_head = nn.ModuleList([nn.Linear(d, vocab, bias=True) for _ in range(num_heads)])
        for lm in self.hydra_lm_head:
            lm.weight.data[:] = lm_head_init_weight[:]

    def context(self, base_hidden):
        return base_hidden

    def head_lm(self, i):
        return self.hydra_lm_head[i]

    def forward(self, base_hidden, input_ids):
        emb = self.input_embed_fn(input_ids)
        inputs = [self.context(base_hidden)] + [
            torch.roll(emb, shifts=-(i + 1), dims=1) for i in range(self.num_heads)
        ]
        return [
            self.head_lm(i)(self.hydra_mlp[i](torch.cat(inputs[: i + 2], dim=-1)))
            for i in range(self.num_heads)
        ]


class OrigHydraPrefixMLP(OrigHydraMLP):
    """arch "prefix-mlp" (Hydra++): a 1-layer LlamaModel over the base hidden states, dropout everywhere."""

    def __init__(
        self, num_layers, num_heads, input_embed_fn, base_config, lm_head_init_weight, dropout_rate=0.2
    ):
        nn.Module.__init__(self)
        d, vocab = base_config.hidden_size, base_config.vocab_size
        self.num_heads = num_heads
        prefix_config = copy.deepcopy(base_config)
        prefix_config.num_hidden_layers = 1
        self.prefix_embeding_layer = LlamaModel(prefix_config)  # (sic) with its unused embed_tokens
        self.input_embed_fn = input_embed_fn
        self.hydra_mlp = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Dropout(dropout_rate),
                    OrigResBlock(d, i + 1),
                    *([nn.Dropout(dropout_rate), OrigResBlock(d)] * (num_layers - 1)),
                )
                for i in range(num_heads)
            ]
        )
        self.hydra_lm_head = nn.ModuleList(
            [nn.Sequential(nn.Dropout(dropout_rate), nn.Linear(d, vocab)) for _ in range(num_heads)]
        )
        for lm in self.hydra_lm_head:
            lm[1].weight.data[:] = lm_head_init_weight[:]

    def context(self, base_hidden):
        return self.prefix_embeding_layer(inputs_embeds=base_hidden)[0]


def _write_legacy(folder: pathlib.Path, base, randomize, arch, num_layers=3, num_heads=H):
    cls = OrigHydraPrefixMLP if arch == "prefix-mlp" else OrigHydraMLP
    torch.manual_seed(11)
    orig = cls(
        num_layers, num_heads, base.get_input_embeddings(), base.config, base.get_output_embeddings().weight
    )
    for k, (name, p) in enumerate(orig.named_parameters()):  # the base embedding (input_embed_fn) is kept
        if not name.startswith("input_embed_fn"):
            randomize(nn.ParameterList([p]), seed=100 + k)
    orig.eval()
    state = orig.state_dict()
    # the tied-module quirk really is in the file: slots of the repeated block hold one tensor
    if num_layers >= 3:
        first, second = (1, 2) if arch != "prefix-mlp" else (3, 5)
        assert (
            state[f"hydra_mlp.0.{first}.linear.weight"].data_ptr()
            == state[f"hydra_mlp.0.{second}.linear.weight"].data_ptr()
        )
    assert "input_embed_fn.weight" in state
    if arch == "prefix-mlp":
        assert "prefix_embeding_layer.embed_tokens.weight" in state
        # the vendored modeling file of the time kept RoPE inv_freq as a persistent buffer
        state["prefix_embeding_layer.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
    # a copy of the base embedding that differs from the base in use must not overwrite it
    state["input_embed_fn.weight"] = torch.zeros_like(state["input_embed_fn.weight"])
    folder.mkdir(parents=True)
    torch.save(state, folder / "hydra_lm_head.pt")
    legacy_config = {
        "_name_or_path": "ankner/hydra-vicuna-7b-v1.3",
        "base_model_name_or_path": "lmsys/vicuna-7b-v1.3",
        "grounded_heads": True,
        "hidden_state_offset": 0,
        "hydra_head_arch": "prefix-mlp" if arch == "prefix-mlp" else "mlp",
        "hydra_num_heads": num_heads,
        "hydra_num_layers": num_layers,
        "transformers_version": "4.36.2",
    }
    (folder / "config.json").write_text(json.dumps(legacy_config, indent=2))
    return orig


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("arch", ["hydra-mlp", "prefix-mlp"])
def test_legacy_checkpoint_matches_original_structure(tmp_path, tiny_base, randomize, arch, num_layers):
    folder = tmp_path / "legacy"
    embed_before = tiny_base.get_input_embeddings().weight.clone()
    orig = _write_legacy(folder, tiny_base, randomize, arch, num_layers)
    model = HydraModel.from_pretrained(folder, base_model=tiny_base).eval()
    cfg = model.config
    assert (cfg.hydra_head_arch, cfg.grounded_heads, cfg.share_lm_head) == (arch, True, False)
    assert (cfg.hydra_num_heads, cfg.hydra_num_layers) == (H, num_layers)
    assert torch.equal(tiny_base.get_input_embeddings().weight, embed_before)  # base embedding untouched

    ids = _ids(tiny_base.config.vocab_size, seed=4)
    with torch.no_grad():
        out = model(ids)
        want = orig(out.base_hidden, ids)
        for i in range(H):
            got = model.head_logits(i, out.head_hidden[i])
            valid = SEQ - (i + 1)  # torch.roll wraps around at the end; those positions are never trained on
            torch.testing.assert_close(got[:, :valid], want[i][:, :valid], atol=1e-5, rtol=1e-5)
    # and it can be re-saved in the new format, then round-trips exactly
    model.save_pretrained(tmp_path / "converted")
    again = HydraModel.from_pretrained(tmp_path / "converted", base_model=tiny_base).eval()
    assert torch.equal(_all_logits(again, ids), _all_logits(model, ids))
    with safe_open(str(tmp_path / "converted" / "model.safetensors"), "pt") as f:
        assert not any("embed" in k or "inv_freq" in k for k in f.keys())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_legacy_checkpoint_with_pickled_object_is_refused(tmp_path, tiny_base, randomize):
    folder = tmp_path / "legacy"
    _write_legacy(folder, tiny_base, randomize, "hydra-mlp", num_layers=1)
    state = torch.load(folder / "hydra_lm_head.pt", weights_only=True)
    marker = tmp_path / "pwned"
    state["payload"] = _Evil(marker)
    torch.save(state, folder / "hydra_lm_head.pt")
    with pytest.raises(ValueError, match=r"hydra_lm_head\.pt"):
        HydraModel.from_pretrained(folder, base_model=tiny_base)
    assert not marker.exists()


def test_legacy_checkpoint_with_unknown_keys_is_refused(tmp_path, tiny_base, randomize):
    folder = tmp_path / "legacy"
    _write_legacy(folder, tiny_base, randomize, "hydra-mlp", num_layers=1)
    state = torch.load(folder / "hydra_lm_head.pt", weights_only=True)
    state["cross_attn.q_proj.weight"] = torch.zeros(2, 2)
    torch.save(state, folder / "hydra_lm_head.pt")
    with pytest.raises(ValueError, match="cross_attn.q_proj.weight"):
        HydraModel.from_pretrained(folder, base_model=tiny_base)


def test_legacy_checkpoint_not_a_state_dict(tmp_path, tiny_base, randomize):
    folder = tmp_path / "legacy"
    _write_legacy(folder, tiny_base, randomize, "hydra-mlp", num_layers=1)
    torch.save([torch.zeros(3)], folder / "hydra_lm_head.pt")
    with pytest.raises(ValueError, match="state dict"):
        HydraModel.from_pretrained(folder, base_model=tiny_base)
    (folder / "hydra_lm_head.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"hydra_lm_head\.pt"):
        HydraModel.from_pretrained(folder, base_model=tiny_base)
