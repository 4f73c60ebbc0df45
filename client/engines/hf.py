"""Hugging Face transformers causal LMs and the store: a prompt's KV cache in whole blocks.

A ``DynamicCache`` holds, per layer, keys and values shaped ``[batch, kv_heads,
tokens, head_dim]``. ``HFKV`` sees one sequence's cache as a paged cache whose
block table is 0..n-1 (a strided view, no copy), so saves and loads take the
client's paged path: a save gathers only the blocks the store lacks, and a load
scatters straight into the tensors the new cache then owns.

Blocks are keyed by a namespace that names the weights (``model_namespace``),
so KV computed by different weights is never mixed up, whatever the models
are called.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from client.client import Client
from kvstore.errors import InvalidArgumentError, LayoutError
from kvstore.keys import Namespace, Tokens, token_array
from kvstore.layout import KVLayout, dtype_name

try:
    from transformers import (
        DynamicCache,
        LlamaConfig,
        LlamaForCausalLM,
        PretrainedConfig,
        PreTrainedModel,
    )
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"client.engines.hf needs Hugging Face transformers ({e}); "
        "install it with: pip install -e '.[engines]'"
    ) from e


def tiny_llama(seed: int = 0, **config: int) -> LlamaForCausalLM:
    """A small Llama-architecture model with random weights from ``seed``
    (4 layers, hidden 256, 4 heads, 2 KV heads, vocab 32k; ``config``
    overrides), fp32 in eval mode: the same weights in every process,
    with nothing downloaded."""
    shape: dict[str, Any] = {
        "vocab_size": 32000,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        **config,
    }
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model.train(False)
    return model


def kv_layout(config: PretrainedConfig, dtype: torch.dtype, *, block_size: int = 16) -> KVLayout:
    """The store layout of a decoder's KV cache (one K and one V per layer)."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    name = dtype_name(dtype)
    if name is None:
        raise LayoutError(f"the store has no layout for KV of {dtype}")
    return KVLayout(
        num_layers=int(config.num_hidden_layers),
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        block_size=block_size,
        dtype=name,
    )


def weights_digest(model: torch.nn.Module) -> str:
    """XXH3-128 of every parameter and buffer, in name order (about 1 GB/s)."""
    h = xxhash.xxh3_128()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def model_namespace(
    model: PreTrainedModel,
    *,
    block_size: int = 16,
    name: str | None = None,
    tenant: str = "default",
) -> Namespace:
    """The namespace of ``model``'s KV: its name, weights digest and layout."""
    label = name or getattr(model.config, "name_or_path", "") or model.config.model_type
    return Namespace(
        f"{label}@{weights_digest(model)[:16]}",
        kv_layout(model.config, model.dtype, block_size=block_size),
        tenant,
    )


class HFKV:
    """Saves and loads one sequence's ``DynamicCache`` through a client."""

    def __init__(self, client: Client, model: PreTrainedModel) -> None:
        _refuse_sliding_windows(model.config)
        want = kv_layout(model.config, model.dtype, block_size=client.layout.block_size)
        if client.layout != want:
            raise LayoutError(
                f"the client's namespace has layout {client.layout}, the model's KV is {want}"
            )
        self.client = client
        self.config = model.config
        self.layout = want

    def lookup(self, tokens: Tokens) -> int:
        """Cached tokens of ``tokens`` that ``load`` would use."""
        return self.client.loadable(tokens)

    def load(
        self, tokens: Tokens, *, device: torch.device | str = "cpu"
    ) -> tuple[int, DynamicCache]:
        """A cache holding the longest stored prefix of ``tokens``, and its length.

        A block that is missing, or fails its checksum on the node, ends the
        prefix there: the caller computes the rest, so a damaged store costs
        time, never correctness.
        """
        ids = token_array(tokens)
        cache = DynamicCache(config=self.config)
        n = self.lookup(ids)
        if not n:
            return 0, cache
        lay = self.layout
        shape = (2, 1, lay.num_kv_heads, n, lay.head_dim)
        buffers = [
            torch.empty(shape, dtype=lay.torch_dtype, device=device) for _ in range(lay.num_layers)
        ]
        nb = n // lay.block_size
        got = self.client.get_paged(ids[:n], [self._paged(b) for b in buffers], torch.arange(nb))
        if got:
            for i, b in enumerate(buffers):
                cache.update(b[0, :, :, :got], b[1, :, :, :got], i)
        return got, cache

    def save(self, tokens: Tokens, cache: DynamicCache) -> int:
        """Store the full blocks of ``tokens`` from ``cache`` (which holds at
        least their KV); the blocks the store has are not copied. Returns the
        tokens the store now covers."""
        ids = token_array(tokens)
        lay = self.layout
        nb = len(ids) // lay.block_size
        if len(cache.layers) != lay.num_layers:
            raise LayoutError(
                f"the cache has {len(cache.layers)} layers, the layout {lay.num_layers}"
            )
        if cache.get_seq_length() < nb * lay.block_size:
            raise InvalidArgumentError(
                f"the cache holds {cache.get_seq_length()} tokens, fewer than the "
                f"{nb * lay.block_size} to save"
            )
        if not nb:
            return 0
        layers = []
        for layer in cache.layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if k is None or v is None or k.shape[0] != 1:
                raise InvalidArgumentError("save takes the cache of one sequence (batch 1)")
            layers.append(self._paged(torch.stack((k, v))))
        return self.client.put_paged(ids, layers, torch.arange(nb))

    def _paged(self, kv: torch.Tensor) -> torch.Tensor:
        """``[2, 1, heads, tokens, dim]`` as paged ``[2, blocks, bs, heads, dim]``
        over its whole blocks: a view, so gathers read and scatters write it."""
        bs = self.layout.block_size
        two, _, heads, n, dim = kv.shape
        nb = n // bs
        return kv[:, 0, :, : nb * bs].view(two, heads, nb, bs, dim).permute(0, 2, 3, 1, 4)


def _refuse_sliding_windows(config: PretrainedConfig) -> None:
    """A sliding-window layer's cache keeps only its last ``window`` tokens, so
    the KV of a longer prefix is not there to store: refuse, naming the layer."""
    for i, kind in enumerate(getattr(config, "layer_types", None) or []):
        if kind != "full_attention":
            window = getattr(config, "sliding_window", None)
            raise LayoutError(
                f"layer {i} of this {config.model_type} model uses {kind} (window {window}): "
                "its cache drops tokens past the window, so the store cannot hold its "
                "prefix KV; only models whose every layer is full attention are supported"
            )


@dataclass(frozen=True)
class Generation:
    """A greedy generation and where its prompt's KV came from."""

    tokens: list[int]  # generated, the first from the prompt's last position
    logits: torch.Tensor  # [len(tokens), vocab], fp32, the logits each token was chosen from
    cached: int  # prompt tokens whose KV was loaded from the store
    computed: int  # prompt tokens the model ran
    ttft_s: float  # from the call to the first token (load + prefill)
    saved: int = 0  # prompt tokens the store covers after this call's save


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    prompt: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    kv: HFKV | None = None,
    save: bool = False,
) -> Generation:
    """Greedy decoding of one prompt; with ``kv``, the prompt's cached prefix
    is loaded instead of computed and (``save``) its full blocks are stored
    after prefill."""
    if max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = torch.as_tensor(prompt, dtype=torch.long).view(-1)
    if not ids.numel():
        raise InvalidArgumentError("the prompt is empty")
    device = model.device
    t0 = time.perf_counter()
    if kv is not None:
        cached, cache = kv.load(ids, device=device)
    else:
        cached, cache = 0, DynamicCache(config=model.config)
    out = model(input_ids=ids[cached:].to(device)[None], cache=cache, use_cache=True)
    logits = [out.logits[0, -1].float()]
    tokens = [int(logits[0].argmax())]
    ttft = time.perf_counter() - t0
    saved = kv.save(ids, out.cache) if kv is not None and save else 0
    cache = out.cache
    for _ in range(max_new_tokens - 1):
        step = torch.tensor([[tokens[-1]]], device=device)
        out = model(input_ids=step, cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits[0, -1].float())
        tokens.append(int(logits[-1].argmax()))
    return Generation(
        tokens=tokens,
        logits=torch.stack(logits).cpu(),
        cached=cached,
        computed=ids.numel() - cached,
        ttft_s=ttft,
        saved=saved,
    )
