"""Security basics against a real node: with a token configured, every RPC
method refuses a call that has no token or a wrong one; and names taken from
requests never become paths outside the data dir."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from client import Client, KVLayout, Namespace
from kvstore.errors import AuthError
from kvstore.wire import AUTH_HEADER, METHODS
from tests.node import running_node


def _raw_call(url: str, method: str, token: str | None) -> grpc.StatusCode:
    meta = [(AUTH_HEADER, f"Bearer {token}")] if token is not None else []
    with grpc.insecure_channel(url.removeprefix("kvstore://")) as ch:
        m = METHODS[method]
        call = (ch.unary_stream if m.streaming else ch.unary_unary)(m.path)
        try:
            out = call(b"", metadata=meta, timeout=10)
            if m.streaming:
                list(out)
        except grpc.RpcError as e:
            return e.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK


def test_every_method_refuses_calls_without_the_token(tmp_path: Path) -> None:
    with running_node(tmp_path / "ssd", "--token", "s3cret") as node:
        for method in METHODS:
            assert _raw_call(node.url, method, None) == grpc.StatusCode.UNAUTHENTICATED, method
            assert _raw_call(node.url, method, "guess") == grpc.StatusCode.UNAUTHENTICATED, method
            # with the token the call gets past auth (an empty request may still be invalid)
            assert _raw_call(node.url, method, "s3cret") != grpc.StatusCode.UNAUTHENTICATED, method
        layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_size=16, dtype="uint8")
        with pytest.raises(AuthError):
            Client.connect(node.url, namespace=Namespace("m", layout), token="guess")


def test_names_from_requests_never_reach_the_file_system(tmp_path: Path) -> None:
    data = tmp_path / "data"
    outside = sorted(p for p in tmp_path.rglob("*"))
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_size=16, dtype="uint8")
    hostile = Namespace("../../../../tmp/evil", layout, tenant="../../x/..")
    with running_node(data / "ssd") as node, Client.connect(node.url, namespace=hostile) as c:
        tokens = list(range(64))
        kv = torch.randint(0, 256, layout.prompt_shape(64), dtype=torch.uint8)
        assert c.put(tokens, kv) == 64
    created = sorted(p for p in tmp_path.rglob("*") if p not in outside)
    assert created and all(p.is_relative_to(data) for p in created), created
    assert not Path("/tmp/evil").exists()
