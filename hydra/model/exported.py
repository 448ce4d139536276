"""The base decoder ahead-of-time compiled (`torch.export` + AOTInductor), for decoding on a CPU.

A decoder compiled by `torch.compile` still runs Python around every call: TorchDynamo checks its guards (one
per weight tensor and module attribute, ~0.26 ms on the default model), gathers ~200 weight tensors into the
graph's inputs and replays the modules' attribute changes afterwards; with the runtime wrappers that was 2.4
ms of a one-token forward of 8.45 ms in one measurement. An exported program compiled by AOTInductor has no
guards and holds the weights as its own constants: a call passes the new tokens, their positions, the
attention mask and the KV cache's buffers, and runs the generated C++ directly (README, "Compiled decoder",
for the measured effect). The kernels are the ones inductor generates for `torch.compile`, so the outputs are
the same (bit for bit on the int4 default model, README).

Two programs per decoder, each exported and compiled the first time a forward of its kind runs (about a
minute each on the default model; `hydra.model.compiled.warm_up` runs both up front) and kept in a cache
folder (`compile_decoder`: `exported/` in the hydra cache), where later processes load them in seconds:
- one new token: the plain step (0 and 1 are special sizes for the exporter, so one token has its own);
- any number of new tokens >= 2: the prompt and tree verification.
Both take the cache length from the mask's width (past + new tokens), so every length shares one program;
a forward without a mask gets the causal one (`chain_attention_mask`), the mask the eager model
builds for itself. The KV buffers are inputs written in place, of sizes fixed per program
(`hydra.model.generate.new_kv_cache` gives a compiled decoder buffers of the model's whole context); a cache
or mask of other sizes or dtypes gets a program of its own.

For models whose tree masks are one tensor (every layer attends alike); a family with sliding-window layers
takes a mask per layer type and keeps `torch.compile` (`supports_export`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from hydra.model.attention import takes_bool_mask
from hydra.model.families import chain_attention_mask
from hydra.model.kv_cache import TreeKVCache

# This package's model files that no exported program runs (the decoding loop; tree, acceptance, lookup and
# pacing rules; the heads' model, configuration and legacy reader; the torch.compile path): they are left out
# of a program's digest, so editing them does not cost a minute of recompilation. What they change in the
# decoder (its attention implementation, its weights) is in the digest anyway. Every other file here is in
# it, a new one included, so a file the decoder does run (KV cache, attention, quantized and fused layers)
# cannot be missed.
NOT_TRACED = frozenset({"acceptance.py", "compiled.py", "config.py", "generate.py", "hydra_model.py",
                        "legacy.py", "lookup.py", "pacing.py", "trees.py"})


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
    `hidden_states` when asked). A program holds the weights as they were when it was compiled (the base is
    frozen); `cache`: the folder that keeps compiled programs across processes (None: none)."""

    def __init__(self, decoder: nn.Module, config, cache: Path | None = None):
        self.decoder, self.config, self.cache = decoder, config, cache
        self.dtype = decoder.get_input_embeddings().weight.dtype
        self.programs: dict[tuple, object] = {}  # (one token, all hidden states, input kinds) -> runner
        self._model_digest: str | None = None

    def __call__(self, input_ids: torch.Tensor, past_key_values: TreeKVCache,
                 position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 output_hidden_states: bool = False, use_cache: bool = True) -> BaseModelOutputWithPast:
        # use_cache is taken for the decoder's signature; the cache is always written.
        cache, new = past_key_values, input_ids.shape[1]
        start, end = cache.slots_for(new)
        if position_ids is None:
            position_ids = torch.arange(start, end, device=input_ids.device)[None]
        if attention_mask is None:
            attention_mask = chain_attention_mask(new, start, self.dtype, takes_bool_mask(self.config),
                                                  self.config, input_ids.device)
        inputs = [input_ids, position_ids, attention_mask, *cache.k, *cache.v]
        # A program runs only inputs of the dtypes and fixed sizes it was compiled for (it does not check
        # them), so those are part of its key: a cache or mask of another kind gets a program of its own.
        one_token = new == 1
        key = (one_token, output_hidden_states, attention_mask.dtype, cache.k[0].shape, cache.k[0].dtype,
               len(cache.k))
        if key not in self.programs:
            self.programs[key] = self._load(inputs, key)
        outputs = self.programs[key].run(inputs)
        cache.length = end
        return BaseModelOutputWithPast(last_hidden_state=outputs[0],
                                       hidden_states=tuple(outputs[1:]) if output_hidden_states else None)

    def _load(self, inputs: list[torch.Tensor], key: tuple):
        """The compiled program for inputs of this kind: from the cache folder if it holds one, else exported
        and compiled now (and kept there)."""
        if self.cache is not None:
            try:
                self.cache.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # e.g. a read-only home: compile for this process only
                warnings.warn(f"cannot keep compiled programs in {self.cache} ({e}); compiling for this "
                              "process only", stacklevel=3)
                self.cache = None
        if self.cache is None:
            with tempfile.TemporaryDirectory() as tmp:
                return self._compile(inputs, *key[:2], Path(tmp) / "decoder.pt2")
        path = self.cache / f"{self._digest(key)}.pt2"
        if not path.is_file():
            # Written beside its final name and renamed, so a killed compilation leaves no package behind
            # that a later process would take for a whole one.
            with tempfile.TemporaryDirectory(dir=self.cache) as tmp:
                part = Path(tmp) / "decoder.pt2"
                runner = self._compile(inputs, *key[:2], part)
                os.replace(part, path)
            return runner
        try:
            return _load_package(path)
        except RuntimeError:  # not a package this torch can run after all: compile it again
            path.unlink()
            return self._load(inputs, key)

    def _compile(self, inputs: list[torch.Tensor], one_token: bool, all_hidden: bool, path: Path):
        module = _Forward(self.decoder, self.config.num_hidden_layers, all_hidden)
        dim = torch.export.Dim
        new = dim.STATIC if one_token else dim.AUTO  # tokens; one token is its own program
        shapes = ({1: new}, {1: new}, {2: new, 3: dim.AUTO}, (None,) * (len(inputs) - 3))
        with torch.no_grad():
            program = torch.export.export(module, tuple(inputs), dynamic_shapes=shapes, strict=False)
            # The package holds the weights (~125 MB for the default model).
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        return _load_package(path)

    def _digest(self, key: tuple) -> str:
        """What a compiled program depends on: the decoder's weights and configuration, the code traced
        (transformers', torch's, this package's model code but for `NOT_TRACED`), the CPU's instruction set
        the kernels were generated for, and the inputs' kind."""
        if self._model_digest is None:
            h = hashlib.blake2b(digest_size=20)
            tensors = [*self.decoder.named_parameters(), *self.decoder.named_buffers()]
            for name, tensor in sorted(tensors, key=lambda item: item[0]):
                h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
                h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            for source in sorted(Path(__file__).parent.glob("*.py")):
                if source.name not in NOT_TRACED:
                    h.update(source.read_bytes())
            h.update(f"{self.config.to_json_string()} {self.config._attn_implementation}".encode())
            h.update(f"{torch.__version__} {transformers.__version__} {platform.machine()} "
                     f"{torch.backends.cpu.get_cpu_capability()}".encode())
            self._model_digest = h.hexdigest()
        return hashlib.blake2b(f"{self._model_digest} {key}".encode(), digest_size=20).hexdigest()


def _load_package(path: Path):
    # The package's loader runs a flat list of tensors (no pytree work per call).
    return torch._inductor.aoti_load_package(str(path)).loader
