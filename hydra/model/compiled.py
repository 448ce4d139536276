"""The base model's decoder compiled for decoding (`--compile` in the CLI, answer scripts, server and
benchmark).

At batch size 1 on a CPU a forward of a small model is bound by per-operator overhead, not arithmetic: a
one-token forward of SmolLM2-135M runs ~200 ATen operators per layer. Inductor fuses the norms, rotary
embedding, casts and elementwise work around the matrix products into a few C++ kernels (README, "Compiled
decoder", for the measured effect). Two ways to get those kernels, with the same outputs:
- on a CPU, ahead of time (`hydra.model.exported`: `torch.export` + AOTInductor), so that a call runs no
  Python guards or argument handling; for every base whose tree masks are one tensor (`supports_export`);
- otherwise `torch.compile` of the decoder in place (`nn.Module.compile`), with dynamic shapes so that every
  prompt length, tree size and cache length share a graph (on a CPU with inductor's C++ wrapper).
transformers' modeling code and the project's KV cache are traced unmodified either way. Compilation happens
on the first forwards of each kind (prefill, one-token step, tree verification with its mask), so `warm_up`
runs them once up front.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from hydra.model.base_model import cache_dir
from hydra.model.exported import ExportedDecoder, supports_export
from hydra.model.generate import DecodeConfig, ar_generate, hydra_generate
from hydra.model.hydra_model import HydraModel
from hydra.model.prompt_cache import PromptCache


def compile_decoder(model: HydraModel, export: bool | None = None) -> None:
    """Compile `model`'s base decoder in place (every HydraModel sharing this base model gets it). `export`:
    ahead of time (`hydra.model.exported`) rather than with `torch.compile`; None: on a CPU, for every base
    whose masks allow it (`supports_export`). The heads stay eager: compiling the Hydra++ prefix layer and
    the head trunks the same way made a step slower (README, Compiled decoder)."""
    cpu = next(model.parameters()).device.type == "cpu"
    base_config = model.base_model.config
    if export is None:
        export = cpu and supports_export(base_config)
    if export:
        if not supports_export(base_config):
            raise ValueError("this base model has sliding-window layers, whose masks the exported decoder "
                             "does not take; compile it with torch.compile (export=False)")
        model.decoder.hydra_exported = ExportedDecoder(model.decoder, base_config, cache_dir() / "exported")
        return
    # On a CPU, inductor's C++ wrapper makes the graph's ~300 calls (fused kernels, int4 products, attention)
    # from C++ rather than from a generated Python function; at batch size 1 that launch cost is a measurable
    # part of a forward (README, Compiled decoder). On a GPU the default wrapper is kept (not measured there).
    model.decoder.compile(dynamic=True, options={"cpp_wrapper": True} if cpu else None)
    # The decoder's float attributes (norm epsilons, attention scaling) become constants of its graphs instead
    # of inputs converted to tensors and checked on every call (~60 on the default model). Dynamo reads the
    # setting when it traces, which happens inside the decoder's calls, so it is set around those calls only.
    compiled_call = model.decoder._compiled_call_impl
    model.decoder._compiled_call_impl = torch._dynamo.config.patch(specialize_float=True)(compiled_call)


def warm_up(model: HydraModel, config: DecodeConfig, speculative: bool) -> float:
    """Run the forwards decoding will use (prefill, one-token steps and, if `speculative`, tree verification)
    once on a short dummy prompt, so that compilation happens here rather than in the first reply. Returns
    the seconds it took. `config` is the one decoding will use (its tree decides the verify shapes)."""
    start = time.perf_counter()
    # Token ids from the middle of the vocabulary: ordinary tokens, never a special or stop token.
    prompt = list(range(1000, 1008)) if model.lm_head.weight.shape[0] > 2000 else list(range(8))
    # No stop tokens and no pacing: the dummy reply must run its one-token and tree steps, not end at once.
    # A prompt cache of its own: the dummy prompt is no one's.
    short = replace(config, max_new_tokens=4, temperature=0.0, seed=None, stop_token_ids=[], pace=False,
                    prompt_cache=PromptCache())
    for _ in ar_generate(model, prompt, short):
        pass
    # A chat's next turn: a prefill that starts past the rows the prompt cache kept (its own graph under
    # torch.compile, where the mask is built for the cached rows too). The prompts share 5 tokens.
    for _ in ar_generate(model, prompt[:5] + prompt[:3], short):
        pass
    if speculative:
        for _ in hydra_generate(model, prompt, short):
            pass
    return time.perf_counter() - start
