from pathlib import Path

import numpy as np
import pytest
import torch

from client import Client, KVLayout, Namespace
from kvstore.errors import LayoutError, PayloadSizeError
from tests.conftest import LAYOUT, make_config, random_kv, random_tokens

BS = LAYOUT.block_size


def test_prompt_round_trip_through_dram_and_ssd(tmp_path: Path, ns: Namespace) -> None:
    tokens = random_tokens(1000, 1)
    kv = random_kv(1000, 1)
    with Client.local(make_config(tmp_path), namespace=ns) as c:
        assert c.lookup(tokens) == 0
        assert c.put(tokens, kv) == 992  # the 8-token tail is not a full block
        assert c.lookup(tokens) == 992
        out = torch.zeros_like(kv)
        assert c.get(tokens, out) == 992
        assert torch.equal(out[:, :, :992], kv[:, :, :992])
        assert not out[:, :, 992:].any()  # the partial block is left alone
        for seed in range(2, 12):  # push the first prompt down to SSD
            c.put(random_tokens(1024, seed), random_kv(1024, seed))
        c.store.wait_idle()
        out.zero_()
        assert c.get(tokens, out) == 992
        assert torch.equal(out[:, :, :992], kv[:, :, :992])
        assert c.stats().tier("ssd").hits > 0


def test_shared_prefix_is_found_and_only_the_rest_is_missing(ns: Namespace) -> None:
    system = random_tokens(256, 3)
    a = torch.cat([system, random_tokens(100, 4)])
    b = torch.cat([system, random_tokens(300, 5)])
    with Client.local(make_config(None), namespace=ns) as c:
        c.put(a, random_kv(a.numel(), 3))
        assert c.lookup(b) == 256
        out = torch.zeros(LAYOUT.prompt_shape(b.numel()), dtype=torch.float16)
        assert c.get(b, out) == 256


def test_tenants_and_models_are_isolated(ns: Namespace) -> None:
    tokens = random_tokens(128, 6)
    with Client.local(make_config(None), namespace=ns) as c:
        c.put(tokens, random_kv(128, 6))
        other_tenant = c.with_namespace(Namespace(ns.model, LAYOUT, tenant="someone-else"))
        other_model = c.with_namespace(Namespace("other-model", LAYOUT))
        assert other_tenant.lookup(tokens) == 0 and other_model.lookup(tokens) == 0
        out = torch.zeros(LAYOUT.prompt_shape(128), dtype=torch.float16)
        assert other_tenant.get(tokens, out) == 0 and not out.any()


def test_per_block_buffers_of_any_kind(ns: Namespace) -> None:
    tokens = random_tokens(64, 7)
    blocks = [torch.randn(LAYOUT.block_shape).half() for _ in range(4)]
    with Client.local(make_config(None), namespace=ns) as c:
        assert c.put(tokens, blocks) == 64
        outs = [
            np.zeros(LAYOUT.block_nbytes, np.uint8),
            bytearray(LAYOUT.block_nbytes),
            torch.zeros(LAYOUT.block_shape, dtype=torch.float16),
            memoryview(bytearray(LAYOUT.block_nbytes)),
        ]
        assert c.get(tokens, outs) == 64
        for want, got in zip(blocks, outs, strict=True):
            assert LAYOUT.view_block(got).equal(want)


def test_bf16_and_strided_kv(tmp_path: Path) -> None:
    lay = KVLayout(num_layers=2, num_kv_heads=4, head_dim=32, block_size=8, dtype="bfloat16")
    ns = Namespace("bf16-model", lay)
    full = torch.randn(2, 2, 4, 40, 32).to(torch.bfloat16)  # heads before tokens: engine order
    kv = full.permute(0, 1, 3, 2, 4)  # a strided view in the layout's order
    tokens = random_tokens(40, 8)
    with Client.local(make_config(tmp_path, dram=1 << 20), namespace=ns) as c:
        c.put(tokens, kv)
        out = torch.zeros(lay.prompt_shape(40), dtype=torch.bfloat16)
        assert c.get(tokens, out) == 40
        assert torch.equal(out, kv)


def test_wrong_shapes_and_sizes_are_refused_without_writing(ns: Namespace) -> None:
    tokens = random_tokens(64, 9)
    with Client.local(make_config(None), namespace=ns) as c:
        with pytest.raises(LayoutError):
            c.put(tokens, torch.zeros(LAYOUT.prompt_shape(64), dtype=torch.float32))
        with pytest.raises(LayoutError):
            c.put(tokens, torch.zeros(LAYOUT.prompt_shape(32), dtype=torch.float16))
        with pytest.raises(PayloadSizeError):
            c.put(tokens, [bytearray(LAYOUT.block_nbytes)] * 3 + [bytearray(10)])
        assert c.stats().blocks == 0
