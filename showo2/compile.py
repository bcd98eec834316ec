"""torch.compile for the hot steps, in one place: which backend and mode, and the dynamo settings they need.

What is compiled (each piece where it is called, never with a decorator in the model file):
- the exact T2I step (`PrefixCachedVelocity.velocity`), whole, fullgraph: static caches written in place, no host
  syncs. A new batch size or prefix length recompiles once, then dynamo's automatic dynamic shapes make them
  symbolic, so later batches reuse the graph;
- the FlashU T2I step per region (flashu/generation.py): one LLM decoder layer's code, compiled once and run by
  every layer (each layer writes its cache through `LayerKV`, so no graph depends on the layer index), the image
  path, the flow-head blocks and the final layer. A new skip list only changes which layers are called; the pruned
  and the full FFN width are one graph each: a whole FlashU plan compiles nothing after its first calls;
- VQA decoding (`showo2.vqa.static_decode_step`) on a StaticDecodeKVCache: the batch padded to a power of two and
  the cache to a multiple of 64 slots (one cache per bucket, grown for a longer prompt, kept for shorter ones), so
  every token of every batch in a bucket runs one graph; on CUDA under
  mode="reduce-overhead" (CUDA graphs: the cache buffers are marked static, they never move);
- the FlashU VQA decode step (flashu/understanding.py `specialist_decode_step`, its FFN widths and its two key
  layouts, before and after token pruning), compiled there with `Compiler.__call__` and `static_cache` on the same
  buckets and caches (a StaticDecoder subclass): one graph per bucket, as the exact step. Not with layer skipping
  on (a skip set per step would be a graph per step): that specialist decodes eager;
- the VQA prefill's attention: FlexAttention (`Compiler.flex_attention`) with the omni mask as a block mask
  (modeling.omni_flex_mask), so the masked upper half and the padding are skipped block by block;
- the VQA image path (`Compiler.compile_image_path`): the VAE encoder and the semantic layers of
  `Showo2.embed_image`, compiled in place because `showo2.vqa.prompt_embeddings` calls them from inside every
  decode function. Batch shapes as for the T2I step: a second batch size makes the batch dimension dynamic.

A function whose compilation fails (a kernel this torch cannot build for this card) runs eager from then on, with
one warning (`CompiledOrEager`; `Compiler.failures` names it, and bench.gpu records it): compiling is a speed setting,
never the reason a job fails. Seen here: inductor's CPU FlexAttention fails to build for dynamic shapes in torch 2.13.

`model.compile` (jobs/spec.py) picks: "auto" compiles on CUDA (inductor) and not on CPU, "off" never, "on" also on
CPU, where the backend is "eager" (dynamo's graphs and guards without code generation: it tests the compiled
path, it is not a speed-up). Compiled results equal eager ones up to float rounding (tests/showo2/test_compile.py).
"""

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch._dynamo
from torch.nn.attention.flex_attention import flex_attention

from flashu_batch.showo2.kv_cache import StaticDecodeKVCache
from flashu_batch.showo2.modeling import Showo2
from flashu_batch.showo2.vae import WanVAE
from flashu_batch.showo2.vqa import StaticDecoder, static_decode_step

# Graphs one compiled function may keep before dynamo gives up on it (and runs it eager): the FlashU layer has two
# (pruned and full FFN width) and one more per batch shape until shapes turn dynamic; the decode step one per
# (batch bucket, cache length). Dynamo's default of 8 is too few for the decode buckets.
RECOMPILE_LIMIT = 64


class CompiledOrEager:
    """fn compiled, until compiling it fails (dynamo or the backend raise a TorchDynamoException, before the graph
    runs: nothing was done twice); then fn itself from that call on, with one warning, and its name in `failures`.
    Compiling changes speed, not results, so a kernel this torch cannot build for this card costs speed, not the
    job. Errors of the computation itself (out of memory, bad input) pass through."""

    def __init__(self, fn, compiled, failures: list):
        self.fn, self.compiled, self.failures = fn, compiled, failures

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:
                name = getattr(self.fn, "__qualname__", repr(self.fn))
                first_line = (str(e).splitlines() or [""])[0][:300]  # dynamo's messages run to pages
                warnings.warn(f"compiling {name} failed ({type(e).__name__}: {first_line}); it runs eager from now on "
                              f"(model.compile: off skips compiling)", RuntimeWarning)
                self.compiled = None
                self.failures.append(name)
        return self.fn(*args, **kwargs)


@dataclass(frozen=True)
class Compiler:
    """compiler(fn) -> fn compiled fullgraph with this backend and mode (one wrapper per function; eager again if its
    compilation fails, see CompiledOrEager: `failures` names those functions, e.g. for a benchmark's record)."""

    backend: str = "inductor"  # "eager" or "aot_eager": fast compiles for CPU tests
    mode: str | None = None  # torch.compile's mode for the T2I steps
    decode_mode: str | None = None  # for the VQA decode step: "reduce-overhead" (CUDA graphs) on CUDA
    _compiled: dict = field(default_factory=dict, compare=False, repr=False)
    failures: list = field(default_factory=list, compare=False, repr=False)

    def __call__(self, fn, *, decode: bool = False):
        if fn not in self._compiled:
            configure_dynamo()
            mode = self.decode_mode if decode else self.mode
            compiled = torch.compile(fn, backend=self.backend, mode=mode, fullgraph=True,
                                     dynamic=False if decode else None)  # decode: one graph per bucket
            self._compiled[fn] = CompiledOrEager(fn, compiled, self.failures)
        return self._compiled[fn]

    def compile_image_path(self, vae: WanVAE, model: Showo2) -> None:
        """Compile, in place, what turns a VQA image into image tokens: the VAE encoder (`WanVAE.encode`'s convolutions)
        and the SigLIP encoder layers and fusion projection of `Showo2.embed_image`; the two patch embeddings (one
        conv each), the 1x1 `conv1` and the latent normalisation stay eager. Each module's `forward` is replaced by
        its compiled form (`self(forward)`, so a failed compilation runs eager, as every compiled function here): the
        modules and their state-dict keys stay, and every caller of the two methods then runs them compiled: call it
        once, on the worker's own model. No channels-last here: the VAE's convolutions slice their 5-D weights per
        call (`FrameConv3d`), and inductor chooses channels-last for conv graphs itself (`layout_optimization`)."""
        for module in (vae.encoder, model.und_trans, model.fusion_proj):
            module.forward = self(module.forward)  # an instance attribute: nn.Module.__call__ calls it

    def flex_attention(self):
        """FlexAttention compiled (a fused kernel that skips the blocks a mask hides; eager it is not): the VQA
        prefill's attention. Prompt lengths vary, so after the second length its graph takes them symbolically."""
        return self(flex_attention)

    def static_decoder(self) -> StaticDecoder:
        """The VQA decoder of one worker: the prefill on FlexAttention, the compiled decode step, one cache per batch
        bucket, static buffers."""
        return StaticDecoder(self(static_decode_step, decode=True), new_cache=static_cache,
                             attend=self.flex_attention())


def configure_dynamo() -> None:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def static_cache(*shape) -> StaticDecodeKVCache:
    """A StaticDecodeKVCache whose buffers CUDA graphs may write in place: marked as static addresses."""
    cache = StaticDecodeKVCache(*shape)
    for buffer in cache.keys + cache.values:
        torch._dynamo.mark_static_address(buffer)
    return cache


def compiler_for(setting: Literal["auto", "on", "off"], device) -> Compiler | None:
    """The Compiler of a worker on `device` for model.compile = setting, or None (eager)."""
    cuda = torch.device(device).type == "cuda"
    if setting == "off" or (setting == "auto" and not cuda):
        return None
    if cuda:
        return Compiler(decode_mode="reduce-overhead")
    return Compiler(backend="eager")
