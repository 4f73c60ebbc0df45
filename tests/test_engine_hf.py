"""A real transformer's KV through a real ``kvstore serve`` node: decoding
with the prefix loaded from the store gives exactly what computing everything
in one process gives, and a missing or damaged block only costs recompute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from client import Client
from client.engines.hf import HFKV, Generation, generate, model_namespace, tiny_llama
from client.remote import RemoteStore
from kvstore.errors import LayoutError
from kvstore.keys import Namespace
from kvstore.tiers.segment import ScanReport, load_secret, scan
from tests.conftest import random_tokens
from tests.node import NodeProcess, running_node, start_node

BS = 16
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(0)


@pytest.fixture(scope="module")
def ns(model: torch.nn.Module) -> Namespace:
    return model_namespace(model, block_size=BS, name="tiny-llama")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    with running_node(None) as n:
        yield n


def _prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in random_tokens(n, seed)]


def _same_decode(got: Generation, want: Generation) -> None:
    assert got.tokens == want.tokens
    assert float((got.logits - want.logits).abs().max()) <= 1e-5


def _blocks(url: str) -> int:
    store = RemoteStore(url)
    try:
        return store.stats().blocks
    finally:
        store.close()


def test_decode_from_the_store_matches_one_process(model, ns, node) -> None:  # type: ignore[no-untyped-def]
    prompt = _prompt(150, seed=1)  # 9 full blocks and 6 tokens
    want = generate(model, prompt, 12)  # one process, everything computed
    with Client.connect(node.url, namespace=ns) as prefill:
        g = generate(model, prompt, 1, kv=HFKV(prefill, model), save=True)
        assert (g.cached, g.computed, g.saved) == (0, 150, 144)
        assert g.tokens == want.tokens[:1]
    with Client.connect(node.url, namespace=ns) as decode:  # another connection, as a decode worker
        kv = HFKV(decode, model)
        got = generate(model, prompt, 12, kv=kv)
        assert (got.cached, got.computed) == (144, 6)
        _same_decode(got, want)
        # the loaded KV is bit for bit what prefill computed
        n, cache = kv.load(prompt)
        with torch.inference_mode():
            full = model(torch.tensor([prompt]), use_cache=True).cache
        assert n == 144
        for loaded, computed in zip(cache.layers, full.layers, strict=True):
            assert torch.equal(loaded.keys, computed.keys[:, :, :n])
            assert torch.equal(loaded.values, computed.values[:, :, :n])


def test_a_shared_system_prompt_is_computed_once(model, ns, node) -> None:  # type: ignore[no-untyped-def]
    system = _prompt(100, seed=2)  # 6 full blocks and 4 tokens
    a, b = system + _prompt(50, seed=3), system + _prompt(60, seed=4)
    want_b = generate(model, b, 8)
    before = _blocks(node.url)
    with Client.connect(node.url, namespace=ns) as c:
        kv = HFKV(c, model)
        assert generate(model, a, 1, kv=kv, save=True).saved == 144
        assert kv.lookup(b) == 96  # only the system prompt's whole blocks
        g = generate(model, b, 1, kv=kv, save=True)
        assert (g.cached, g.computed, g.saved) == (96, 64, 160)
        # A's 9 blocks, and B's 10 of which 6 are shared: 13 stored, none twice
        assert _blocks(node.url) - before == 13
        got = generate(model, b, 8, kv=kv)
        assert (got.cached, got.computed) == (144, 16)  # the last block: its last token is computed
        _same_decode(got, want_b)


def test_a_missing_block_falls_back_to_recompute(model, ns, node) -> None:  # type: ignore[no-untyped-def]
    prompt = _prompt(120, seed=5)
    want = generate(model, prompt, 8)
    with Client.connect(node.url, namespace=ns) as c:
        kv = HFKV(c, model)
        generate(model, prompt, 1, kv=kv, save=True)
        assert c.delete([c.keys(prompt)[3]]) == 1
        got = generate(model, prompt, 8, kv=kv)
        assert (got.cached, got.computed) == (48, 72)
        _same_decode(got, want)


def test_a_corrupted_block_on_disk_falls_back_to_recompute(model, ns, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    prompt = _prompt(130, seed=6)  # 8 full blocks
    want = generate(model, prompt, 8)
    ssd = tmp_path / "ssd"
    with running_node(ssd) as n, Client.connect(n.url, namespace=ns) as c:
        generate(model, prompt, 1, kv=HFKV(c, model), save=True)
        bad = c.keys(prompt)[5]
    # the node wrote its DRAM blocks to SSD on shutdown; damage block 5's payload there
    flipped = 0
    secret = load_secret(ssd)
    for seg in sorted(ssd.glob("seg-*.log")):
        fd = os.open(seg, os.O_RDWR)
        try:
            for rec in scan(fd, os.fstat(fd).st_size, ScanReport(), secret):
                if rec.key == bad:
                    at = rec.payload_offset + rec.raw_len // 2
                    byte = os.pread(fd, 1, at)
                    os.pwrite(fd, bytes([byte[0] ^ 0x40]), at)
                    flipped += 1
        finally:
            os.close(fd)
    assert flipped == 1
    node = start_node(ssd)
    try:
        with Client.connect(node.url, namespace=ns) as c:
            got = generate(model, prompt, 8, kv=HFKV(c, model))
            assert (got.cached, got.computed) == (80, 50)  # blocks 0-4 loaded, the rest computed
            _same_decode(got, want)
            assert c.stats().checksum_failures == 1
    finally:
        rc, err = node.stop()
        assert rc == 0, err


def test_other_weights_never_see_this_models_kv(model, ns, node) -> None:  # type: ignore[no-untyped-def]
    other = tiny_llama(1)
    other_ns = model_namespace(other, block_size=BS, name="tiny-llama")
    assert other_ns.model != ns.model  # same name and shape, different weights
    prompt = _prompt(100, seed=7)
    with Client.connect(node.url, namespace=ns) as c:
        generate(model, prompt, 1, kv=HFKV(c, model), save=True)
        with c.with_namespace(other_ns) as c2:
            got = generate(other, prompt, 4, kv=HFKV(c2, other))
    assert got.cached == 0
    _same_decode(got, generate(other, prompt, 4))


def test_a_namespace_whose_layout_differs_from_the_model_is_refused(model, node) -> None:  # type: ignore[no-untyped-def]
    fp32 = model_namespace(model, block_size=BS, name="tiny-llama")
    bf16 = Namespace(fp32.model, replace(fp32.layout, dtype="bfloat16"))
    prompt = _prompt(40, seed=8)
    with Client.connect(node.url, namespace=bf16) as c:
        with pytest.raises(LayoutError, match="bfloat16"):
            HFKV(c, model)
        assert c.lookup(prompt) == 0


def test_a_sliding_window_model_is_refused_naming_its_layer(node) -> None:  # type: ignore[no-untyped-def]
    """Qwen2 with sliding windows on layers 2 and 3: their caches keep only
    the window, so saving them would store a prefix with holes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=32,
        max_window_layers=2,
    )
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(config).eval()
    ns = model_namespace(qwen, block_size=BS)
    with (
        Client.connect(node.url, namespace=ns) as c,
        pytest.raises(LayoutError, match=r"layer 2 .*sliding_attention .*window 32"),
    ):
        HFKV(c, qwen)


def test_the_pd_demo_runs_three_processes_and_matches(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvstore", "demo", "pd", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    steps = {(s["request"], s["worker"], s["store"]): s for s in result["steps"]}
    # --quick: a 256-token system prompt, 40-token questions (296 tokens each)
    assert steps[("A", "decode", True)]["cached"] == 288
    assert steps[("B", "prefill", True)]["cached"] == 256  # the system prompt's blocks
    assert steps[("B", "prefill", True)]["computed"] == 40
    assert steps[("B", "decode", True)]["tokens"] == steps[("B", "decode", False)]["tokens"]
    assert result["tokens_match"] and result["prefill_tokens_saved"] == 288 + 256 + 288
