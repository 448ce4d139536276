"""A compiled base decoder (`hydra.model.compiled`: exported ahead of time, or `torch.compile`) decodes
exactly as the eager one: same greedy tokens for plain and speculative decoding (static, dynamic and Hydra++
prefix-layer paths), and the warm-up compiles every forward kind up front so decoding adds no compilation."""

import pytest
import torch
from helpers import make_heads, make_tiny_base

from hydra.model.attention import takes_bool_mask
from hydra.model.compiled import compile_decoder, warm_up
from hydra.model.families import chain_attention_mask
from hydra.model.generate import DecodeConfig, ar_generate, generate, new_kv_cache
from hydra.model.hydra_model import decoder_is_compiled, exported_decoder
from hydra.model.prompt_cache import PromptCache

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # inductor's notes on CPU codegen

PROMPTS = [[3, 17, 40, 5, 9], [11, 2, 33, 33, 60, 1, 0, 45, 12, 8, 19, 23, 7]]
TREES = ["tree_8", "dynamic:6:3:3:fixed"]


def _outputs(model) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        cfg = DecodeConfig(max_new_tokens=24, stop_token_ids=[])
        out.append(generate(model, prompt, cfg, speculative=False).tokens)
        out += [generate(model, prompt, DecodeConfig(tree=t, max_new_tokens=24, stop_token_ids=[])).tokens
                for t in TREES]
        # a second turn on the first one's cache rows (a prompt cache): the prefill starts past them
        cfg = DecodeConfig(tree=TREES[0], max_new_tokens=24, stop_token_ids=[], prompt_cache=PromptCache())
        first = generate(model, prompt, cfg).tokens
        out.append(generate(model, prompt + first + [5, 6], cfg).tokens)
        assert cfg.prompt_cache.reused_tokens >= len(prompt + first) - 1
    return out


def test_torch_compiled_decoder_decodes_as_the_eager_one():
    base = make_tiny_base(64, scale=0.3, max_position_embeddings=128)
    model = make_heads(base, "prefix-mlp", num_heads=4, num_layers=1)
    eager = _outputs(model)
    assert all(out == eager[0] for out in eager[:3])  # speculative == plain greedy, eager (sanity)
    compile_decoder(model, export=False)
    assert decoder_is_compiled(model) and exported_decoder(model) is None
    torch._dynamo.utils.counters.clear()
    warm_up(model, DecodeConfig(tree=TREES[0]), speculative=True)
    warm_up(model, DecodeConfig(tree=TREES[1]), speculative=True)
    compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert not torch._dynamo.config.specialize_float  # set around the decoder's calls only, not left behind
    assert compiled_graphs > 0  # the decoder really ran compiled
    assert _outputs(model) == eager
    # Warm-up covered every kind of forward: decoding compiled nothing new.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_graphs


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """compile_decoder keeps exported programs in the hydra cache: a fresh one per test."""
    monkeypatch.setenv("HYDRA_CACHE", str(tmp_path / "hydra_cache"))


@pytest.mark.parametrize("offset", [0, 1])  # 1: the heads read an earlier layer (all hidden states returned)
def test_exported_decoder_decodes_as_the_eager_one(offset):
    base = make_tiny_base(64, scale=0.3, max_position_embeddings=128)
    model = make_heads(base, "prefix-mlp", num_heads=4, num_layers=1, hidden_state_offset=offset)
    eager = _outputs(model)
    compile_decoder(model)  # on a CPU: exported
    exported = exported_decoder(model)
    assert decoder_is_compiled(model) and exported is not None and not exported.programs
    warm_up(model, DecodeConfig(tree=TREES[0]), speculative=True)
    warm_up(model, DecodeConfig(tree=TREES[1]), speculative=True)
    # one program for one token, one for the prompt and trees; the heads' layers decide the outputs
    assert sorted(key[:2] for key in exported.programs) == [(False, offset > 0), (True, offset > 0)]
    programs = dict(exported.programs)
    model.decoder.forward = None  # decoding no longer calls the eager decoder (nor exports anything)
    assert _outputs(model) == eager
    assert exported.programs == programs  # warm-up compiled every kind of forward


def test_exported_forward_matches_the_eager_one():
    """Hidden states and KV cache rows of an exported forward equal the eager decoder's, for a prompt (no
    mask), one token and a tree; the cache length moves on as the eager cache's."""
    from hydra.model.exported import ExportedDecoder
    from hydra.model.families import tree_attention_mask
    from hydra.model.generate import new_kv_cache

    base = make_tiny_base(64, scale=0.3, max_position_embeddings=128)
    model = make_heads(base, "hydra-mlp", num_heads=2)
    exported = ExportedDecoder(model.decoder, base.config)
    caches = [new_kv_cache(model, 40), new_kv_cache(model, 40)]
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    tree_mask = tree_attention_mask(tree, 10, torch.float32, True)
    steps = [(torch.arange(3, 12), torch.arange(9), None), (torch.tensor([5]), torch.tensor([9]), None),
             (torch.tensor([7, 8, 9]), torch.tensor([10, 11, 11]), tree_mask)]
    with torch.no_grad():
        for tokens, positions, mask in steps:
            outs = [fn(input_ids=tokens[None], position_ids=positions[None], past_key_values=cache,
                       use_cache=True, attention_mask=mask, output_hidden_states=True).hidden_states
                    for fn, cache in zip((model.decoder, exported), caches, strict=True)]
            assert caches[0].length == caches[1].length
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
            n = caches[0].length
            for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
                torch.testing.assert_close(b[:, :, :n], a[:, :, :n], rtol=1e-5, atol=1e-5)


def test_exported_programs_are_kept_and_reused(tmp_path, monkeypatch):
    """A second process (here a second ExportedDecoder) loads the programs from the cache folder instead of
    exporting again and decodes the same; nothing but whole packages is left there; other weights get other
    packages."""
    from hydra.model.exported import ExportedDecoder

    base = make_tiny_base(64, scale=0.3, max_position_embeddings=128)
    model = make_heads(base, "hydra-mlp", num_heads=4)
    config = DecodeConfig(tree=TREES[0], max_new_tokens=12, stop_token_ids=[])

    def decode(cache) -> list[list[int]]:
        model.decoder.hydra_exported = ExportedDecoder(model.decoder, base.config, cache)
        return [generate(model, PROMPTS[1], config, speculative=s).tokens for s in (False, True)]

    want = decode(tmp_path)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".pt2", ".pt2"]  # one token; prompt and trees
    with monkeypatch.context() as patch:
        patch.setattr(torch.export, "export", lambda *a, **k: pytest.fail("exported again"))
        assert decode(tmp_path) == want
    with torch.no_grad():
        base.model.norm.weight.mul_(1.5)
    decode(tmp_path)
    assert len(list(tmp_path.glob("*.pt2"))) == 4
    blocked = tmp_path / "a_file"  # a cache folder that cannot be made: compiled for the process alone
    blocked.write_text("")
    with pytest.warns(UserWarning, match="cannot keep compiled programs"):
        assert len(decode(blocked / "exported")) == 2


def test_export_needs_one_mask_for_all_layers():
    from hydra.model.exported import supports_export

    assert supports_export(make_tiny_base(64).config)
    sliding = make_tiny_base(64).config
    sliding.sliding_window = 16
    assert not supports_export(sliding)
    model = make_heads(make_tiny_base(64), "hydra-mlp", num_heads=2)
    model.base_model.config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding-window"):
        compile_decoder(model, export=True)


def test_warm_up_ignores_stop_tokens_and_sampling():
    """The warm-up reply must run its one-token and tree steps even if the config would stop or sample."""
    base = make_tiny_base(64, scale=0.3, max_position_embeddings=128)
    model = make_heads(base, "hydra-mlp", num_heads=4)
    calls = []
    forward = model.decoder.forward
    model.decoder.forward = lambda *a, **k: calls.append(k["input_ids"].shape[1]) or forward(*a, **k)
    stop_all = DecodeConfig(tree="tree_8", temperature=1.0, stop_token_ids=list(range(64)))
    warm_up(model, stop_all, speculative=True)
    assert 1 in calls and max(calls) > 1 and len(calls) >= 4
    assert next(ar_generate(model, [1, 2], stop_all)).finish_reason == "eos"  # the config itself stops


def test_load_model_compile_flag(tmp_path):
    """--compile in the CLI, server and answer scripts goes through load_model(compile=True)."""
    from helpers import save_tiny_model

    from hydra.inference.loading import load_model

    root = save_tiny_model(tmp_path, heads={"arch": "hydra-mlp", "num_heads": 2})
    assert not decoder_is_compiled(load_model(root / "heads", device="cpu")[0])
    model, has_heads = load_model(root / "heads", device="cpu", compile=True)
    assert has_heads and decoder_is_compiled(model)


def test_digest_leaves_out_only_files_the_export_never_runs(monkeypatch):
    """A program's digest skips `NOT_TRACED`, so editing those files reuses the compiled programs. Check that
    no code of theirs runs while a quantized, fused decoder with fp32 attention is exported (every Python
    call of the trace recorded), and that editing a file it does run changes the digest."""
    import sys
    from pathlib import Path

    from hydra.model import exported
    from hydra.model.attention import use_fp32_attention
    from hydra.model.fused import fuse_siblings
    from hydra.model.quant import quantize_model

    base = make_tiny_base(64, scale=0.3, max_position_embeddings=128)
    quantize_model(base, "int4")
    fuse_siblings(base)
    use_fp32_attention(base)
    model = make_heads(base, "prefix-mlp", num_heads=2, num_layers=1)
    cache = new_kv_cache(model, 32)
    tokens, positions = torch.tensor([[3, 17, 40]]), torch.arange(3)[None]
    mask = chain_attention_mask(3, 0, torch.float32, takes_bool_mask(base.config), base.config)
    inputs = (tokens, positions, mask, *cache.k, *cache.v)
    module = exported._Forward(model.decoder, base.config.num_hidden_layers, all_hidden=False)
    package = Path(exported.__file__).parent
    ran: set[str] = set()

    def record(frame, event, arg):
        if event == "call" and Path(frame.f_code.co_filename).parent == package:
            ran.add(Path(frame.f_code.co_filename).name)

    sys.setprofile(record)
    try:
        with torch.no_grad():
            torch.export.export(module, inputs, strict=False)
    finally:
        sys.setprofile(None)
    assert {"exported.py", "kv_cache.py", "attention.py", "quant.py", "fused.py"} <= ran
    assert not ran & exported.NOT_TRACED

    def digest_after_editing(name: str) -> str:
        read = Path.read_bytes
        with monkeypatch.context() as patch:
            patch.setattr(Path, "read_bytes", lambda p: read(p) + b"#" * (p.name == name))
            return exported.ExportedDecoder(model.decoder, base.config)._digest((True,))

    unedited = digest_after_editing("")
    assert all(digest_after_editing(name) == unedited for name in exported.NOT_TRACED)
    assert all(digest_after_editing(name) != unedited for name in ran)
