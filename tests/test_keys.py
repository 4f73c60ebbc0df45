import numpy as np
import pytest
import torch

from kvstore.errors import InvalidArgumentError, TokenError
from kvstore.keys import KEY_BYTES, Namespace, block_keys, salted_root
from kvstore.layout import KVLayout
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
