import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstore.errors import InvalidArgumentError, TokenError
from kvstore.keys import KEY_BYTES, Namespace, block_keys, salted_root, token_array
from kvstore.layout import KVLayout
from kvstore.store.index import scoped_keys
from native import keys as native_keys
from tests.conftest import LAYOUT


def test_same_prefix_same_keys_and_partial_block_unkeyed(ns: Namespace) -> None:
    tokens = list(range(100))  # 6 full blocks of 16, 4 tokens left over
    keys = block_keys(ns, tokens)
    assert len(keys) == 6 and all(len(k) == KEY_BYTES for k in keys)
    assert len(set(keys)) == 6
    assert block_keys(ns, tokens[:96]) == keys
    assert block_keys(ns, tokens[:50]) == keys[:3]
    assert block_keys(ns, tokens + [7] * 28) == keys + block_keys(ns, tokens + [7] * 28)[6:]


def test_one_changed_token_changes_that_block_and_all_later(ns: Namespace) -> None:
    tokens = list(range(160))
    base = block_keys(ns, tokens)
    for pos in (0, 15, 16, 77, 159):
        changed = tokens.copy()
        changed[pos] += 1
        other = block_keys(ns, changed)
        b = pos // 16
        assert other[:b] == base[:b]
        assert all(o != k for o, k in zip(other[b:], base[b:], strict=True))


def test_namespaces_never_share_keys() -> None:
    tokens = list(range(64))
    variants = [
        Namespace("llama", LAYOUT),
        Namespace("llama", LAYOUT, tenant="other"),
        Namespace("mistral", LAYOUT),
        Namespace("llama", KVLayout(4, 2, 64, 16, dtype="bfloat16")),
        Namespace("llama", KVLayout(5, 2, 64, 16, dtype="float16")),
    ]
    all_keys = [k for v in variants for k in block_keys(v, tokens)]
    assert len(set(all_keys)) == len(all_keys)
    assert Namespace("llama", LAYOUT).root == Namespace("llama", LAYOUT).root


def test_token_containers_agree_and_bad_tokens_are_refused(ns: Namespace) -> None:
    tokens = list(range(1000, 1064))
    want = block_keys(ns, tokens)
    assert block_keys(ns, np.array(tokens, dtype=np.int64)) == want
    assert block_keys(ns, torch.tensor(tokens, dtype=torch.int32)) == want
    assert block_keys(ns, []) == []
    with pytest.raises(TokenError):
        block_keys(ns, [1, -2, 3])
    with pytest.raises(TokenError):
        block_keys(ns, torch.zeros(32))
    with pytest.raises(TokenError):
        block_keys(ns, np.zeros((2, 16), dtype=np.int64))
    with pytest.raises(InvalidArgumentError):
        Namespace("", LAYOUT)


def test_start_continues_a_chain(ns: Namespace) -> None:
    tokens = list(range(96))
    keys = block_keys(ns, tokens)
    assert block_keys(ns, tokens[32:], start=keys[1]) == keys[2:]


def test_a_salt_gives_a_prompt_its_own_chain() -> None:
    ns = Namespace("m", LAYOUT)
    tokens = list(range(64))
    plain = block_keys(ns, tokens)
    a = block_keys(ns, tokens, start=salted_root(ns, b"salt:a"))
    b = block_keys(ns, tokens, start=salted_root(ns, b"salt:b"))
    assert salted_root(ns, b"") is None
    assert len({*plain, *a, *b}) == 3 * len(plain)  # no key shared between the three
    assert a == block_keys(ns, tokens, start=salted_root(ns, b"salt:a"))


def _sha_chain(root: bytes, tokens: np.ndarray, bs: int) -> list[bytes]:
    """The key definition written out once more, with hashlib, block by block."""
    out, prev = [], root
    raw = tokens.astype("<u4").tobytes()
    for i in range(len(tokens) // bs):
        prev = hashlib.sha256(prev + raw[i * bs * 4 : (i + 1) * bs * 4]).digest()[:KEY_BYTES]
        out.append(prev)
    return out


@pytest.mark.parametrize("bs", [1, 13, 16, 64, 512, 2048])
def test_native_keys_match_the_definition(bs: int) -> None:
    """The C chain (every padding case: a message of 1, 2 or many SHA blocks)
    gives the keys SHA-256 defines, from the root and from a start key."""
    assert native_keys.chain_keys(bytes(16), np.zeros(16, np.uint32), 1, 64) is not None, (
        native_keys.failure()
    )
    ns = Namespace("m", KVLayout(2, 2, 8, bs))
    tokens = np.random.default_rng(bs).integers(0, 2**32, bs * 9 + bs // 2, dtype=np.uint64)
    tokens = tokens.astype(np.uint32)
    assert block_keys(ns, tokens) == _sha_chain(ns.root, tokens, bs)
    start = bytes(range(16))
    assert block_keys(ns, tokens, start=start) == _sha_chain(start, tokens, bs)
    assert block_keys(ns, list(tokens.tolist())) == _sha_chain(ns.root, tokens, bs)
    tag = ns.tag.to_bytes(4, "little")  # scoped: as the store's index holds them
    scoped = block_keys(ns, tokens, start=start, scoped=True)
    assert scoped == [tag + k for k in _sha_chain(start, tokens, bs)]
    assert scoped == scoped_keys(block_keys(ns, tokens, start=start), ns.tag)


def test_native_token_list_matches_array_and_declines_what_it_cannot_take() -> None:
    """A list or tuple of plain ints converts in C to exactly the uint32s
    ``array.array`` gives; anything else (a bool, a numpy int, a negative or
    too large id) is declined, and ``token_array`` then raises or converts
    as before."""
    ids = [0, 1, 2**32 - 1, *range(7, 7000, 3)]
    got = native_keys.token_list(ids)
    assert got is not None, native_keys.tokens_failure()
    assert got.dtype == np.dtype("<u4") and got.tolist() == ids
    assert native_keys.token_list(tuple(ids)).tolist() == ids  # type: ignore[union-attr]
    for bad in (True, np.int64(5), -1, 2**32, 2**70, "x"):
        assert native_keys.token_list([*ids, bad]) is None, bad
    assert token_array([*ids, True]).tolist() == [*ids, 1]  # array.array takes a bool
    assert token_array([*ids, np.int64(5)]).tolist() == [*ids, 5]
    for bad in (-1, 2**32, "x"):
        with pytest.raises(TokenError):
            token_array([*ids, bad])
    ns = Namespace("m", LAYOUT)
    assert block_keys(ns, ids) == block_keys(ns, np.array(ids, dtype=np.uint32))


def test_keys_without_the_native_library_are_the_same() -> None:
    """KVSTORE_NATIVE=0 keys in Python (the fallback): the same keys."""
    code = (
        "import numpy as np, native.keys as nk; from kvstore.keys import Namespace, block_keys;"
        "from kvstore.layout import KVLayout;"
        "ns = Namespace('m', KVLayout(2, 2, 8, 16));"
        "print(b''.join(block_keys(ns, list(range(1000)))).hex(),"
        "b''.join(block_keys(ns, list(range(1000)), scoped=True)).hex(), nk.failure())"
    )
    env = {**os.environ, "KVSTORE_NATIVE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    ns = Namespace("m", KVLayout(2, 2, 8, 16))
    assert out == [
        b"".join(block_keys(ns, list(range(1000)))).hex(),
        b"".join(block_keys(ns, list(range(1000)), scoped=True)).hex(),
        "disabled",
        "by",
        "KVSTORE_NATIVE=0",
    ]


def test_a_changed_source_is_built_under_a_new_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build is keyed by its source: an unchanged one is loaded, never
    rebuilt; an edited one gets a library of its own."""
    monkeypatch.setenv("KVSTORE_NATIVE_CACHE", str(tmp_path))
    first = native_keys.build()
    stamp = first.stat().st_mtime_ns
    assert native_keys.build() == first and first.stat().st_mtime_ns == stamp
    src = tmp_path / "chain_keys.c"
    src.write_text(native_keys.SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(native_keys, "SOURCE", src)
    assert native_keys.library_path() != first
