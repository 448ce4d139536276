"""The base decoder ahead-of-time compiled (`torch.export` + AOTInductor), for decoding on a CPU.

A decoder compiled by `torch.compile` still runs Python around every call: TorchDynamo checks its guards (one
per weight tensor and module attribute, ~0.26 ms on the default model), gathers ~200 weight tensors into the
graph's inputs and replays the modules' attribute changes afterwards; with the runtime wrappers that is
~2-3 ms of a one-token forward of ~8.5 ms. An exported program compiled by AOTInductor has no guards and holds the
weights as its own constants: a call passes the new tokens, their positions, the attention mask and the KV
cache's buffers, and runs the generated C++ directly (README, "Compiled decoder", for the measured effect).
The kernels are the ones inductor generates for `torch.compile`, so the outputs are the same, bit for bit.

Two programs per decoder, each exported and compiled the first time a forward of its kind runs (about a
minute each on the default model; `hydra.model.compiled.warm_up` runs both up front):
- one new token: the plain step (0 and 1 are special sizes for the exporter, so one token has its own);
- any number of new tokens >= 2: the prompt and tree verification.
Both take the cache length from the mask's width (past + new tokens), so every length shares one program;
a forward without a mask gets the causal one (`tree_attention_mask` of a chain), the mask the eager model
builds for itself. The KV buffers are inputs written in place; they must have the shapes of the first ones
(`hydra.model.generate.new_kv_cache` gives a compiled decoder buffers of the model's whole context).

For models whose tree masks are one tensor (every layer attends alike); a family with sliding-window layers
takes a mask per layer type and keeps `torch.compile` (`supports_export`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from hydra.model.attention import BOOL_MASK_ATTENTION
from hydra.model.families import tree_attention_mask
from hydra.model.kv_cache import TreeKVCache


def supports_export(config) -> bool:
    """Whether a base model's tree masks are one tensor for all layers (what the exported programs take)."""
    return getattr(config, "layer_types", None) is None and getattr(config, "sliding_window", None) is None


class _Forward(nn.Module):
    """What is exported: the decoder over new tokens with a `TreeKVCache` made of the given buffers, the
    cache length being the mask's width less the new tokens. Returns the final hidden state and, with
    `all_hidden`, every layer's."""

    def __init__(self, decoder: nn.Module, num_layers: int, all_hidden: bool):
        super().__init__()
        self.decoder, self.num_layers, self.all_hidden = decoder, num_layers, all_hidden

    def forward(self, input_ids, position_ids, attention_mask, *buffers):
        storage = buffers[0].shape[2]
        cache = TreeKVCache(self.num_layers, storage, buffers[0].dtype, storage)
        cache.k, cache.v = list(buffers[:self.num_layers]), list(buffers[self.num_layers:])
        cache.length = attention_mask.shape[-1] - input_ids.shape[1]
        out = self.decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                           past_key_values=cache, use_cache=True, output_hidden_states=self.all_hidden)
        return (out.last_hidden_state, *(out.hidden_states if self.all_hidden else ()))


class ExportedDecoder:
    """Stands in for the base decoder in decoding's forwards (`hydra.model.generate._forward`): the same
    keywords, a `TreeKVCache` as `past_key_values`, and an output with `last_hidden_state` (and
    `hidden_states` when asked)."""

    def __init__(self, decoder: nn.Module, config):
        self.decoder, self.config = decoder, config
        self.dtype = decoder.get_input_embeddings().weight.dtype
        self.programs: dict[tuple, object] = {}  # (one token, all hidden states, input kinds) -> runner

    def __call__(self, input_ids: torch.Tensor, past_key_values: TreeKVCache,
                 position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 output_hidden_states: bool = False, use_cache: bool = True) -> BaseModelOutputWithPast:
        # use_cache is taken for the decoder's signature; the cache is always written.
        cache, new = past_key_values, input_ids.shape[1]
        start, end = cache.slots_for(new)
        if position_ids is None:
            position_ids = torch.arange(start, end, device=input_ids.device)[None]
        if attention_mask is None:
            chain = torch.ones(new, new, dtype=torch.bool, device=input_ids.device).tril_()
            as_bool = self.config._attn_implementation in BOOL_MASK_ATTENTION
            attention_mask = tree_attention_mask(chain, start, self.dtype, as_bool)
        inputs = [input_ids, position_ids, attention_mask, *cache.k, *cache.v]
        # A program runs only inputs of the dtypes and fixed sizes it was compiled for (it does not check
        # them), so those are part of its key: a cache or mask of another kind gets a program of its own.
        one_token = new == 1
        key = (one_token, output_hidden_states, attention_mask.dtype, cache.k[0].shape, cache.k[0].dtype,
               len(cache.k))
        if key not in self.programs:
            self.programs[key] = self._compile(inputs, one_token, output_hidden_states)
        outputs = self.programs[key].run(inputs)
        cache.length = end
        return BaseModelOutputWithPast(last_hidden_state=outputs[0],
                                       hidden_states=tuple(outputs[1:]) if output_hidden_states else None)

    def _compile(self, inputs: list[torch.Tensor], one_token: bool, all_hidden: bool):
        module = _Forward(self.decoder, self.config.num_hidden_layers, all_hidden)
        dim = torch.export.Dim
        new = dim.STATIC if one_token else dim.AUTO  # tokens; one token is its own program
        shapes = ({1: new}, {1: new}, {2: new, 3: dim.AUTO}, (None,) * (len(inputs) - 3))
        with torch.no_grad():
            program = torch.export.export(module, tuple(inputs), dynamic_shapes=shapes, strict=False)
            with tempfile.TemporaryDirectory() as tmp:
                # The package holds the weights (~130 MB for the default model); once loaded it is not needed.
                path = torch._inductor.aoti_compile_and_package(program,
                                                                package_path=str(Path(tmp) / "decoder.pt2"))
                # The package's loader runs a flat list of tensors (no pytree work per call).
                return torch._inductor.aoti_load_package(path).loader
