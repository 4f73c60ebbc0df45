"""Block keys: tokens -> one chained hash per full block.

Block *i*'s key is SHA-256(key of block *i-1* || tokens of block *i* as
little-endian uint32) truncated to 128 bits; block 0 chains from the
namespace's root. So a key names a whole prefix within one namespace: two
prompts share key *i* exactly when they share their first *i+1* blocks, and
keys of different namespaces (model, layout, tenant) never meet.

SHA-256 rather than xxhash because tenants choose the tokens: a fast
non-cryptographic hash would let one tenant craft collisions with another's
prefixes. The chain is computed in C (``native.keys``: OpenSSL's compression,
SHA extensions where the CPU has them, no Python per block); the Python loop
below is the reference it is tested against and the fallback where it
cannot be built.
"""

from __future__ import annotations

import array
import hashlib
import json
import sys
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from kvstore.errors import InvalidArgumentError, TokenError
from kvstore.layout import KVLayout
from native.keys import chain_keys, token_list

if TYPE_CHECKING:
    import torch

KEY_BYTES = 16
BlockKey = bytes  # KEY_BYTES long; plain bytes keep dict lookups and hashing cheap
ScopedKey = bytes  # a namespace tag (4 bytes, little-endian) and a BlockKey: the store's index key
SCOPED_KEY_BYTES = 4 + KEY_BYTES
Tokens: TypeAlias = "Sequence[int] | np.ndarray | torch.Tensor"

_ROOT_DOMAIN = b"kvstore/namespace/v1\x00"


@dataclass(frozen=True)
class Namespace:
    """What a block's bytes depend on: the model, the KV layout and the tenant."""

    model: str
    layout: KVLayout
    tenant: str = "default"
    root: BlockKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidArgumentError("namespace needs a model name")
        canon = json.dumps(
            {"model": self.model, "layout": self.layout.fingerprint(), "tenant": self.tenant},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        object.__setattr__(self, "root", hashlib.sha256(_ROOT_DOMAIN + canon).digest()[:KEY_BYTES])

    @property
    def tag(self) -> int:
        """A 32-bit id of the namespace, stored beside each block for accounting."""
        return int.from_bytes(self.root[:4], "little")

    @property
    def name(self) -> str:
        return f"{self.tenant}/{self.model}"


def scoped(ns_tag: int, key: BlockKey) -> ScopedKey:
    """``key`` as the store indexes it: inside its namespace, so two tenants'
    equal keys are two blocks (a tenant can send any 16 bytes as a key)."""
    return ns_tag.to_bytes(4, "little") + key


def unscoped(key: ScopedKey) -> tuple[int, BlockKey]:
    """(namespace tag, block key) of a scoped key."""
    return int.from_bytes(key[:4], "little"), key[4:]


_U32 = array.array("I")
_NONE = np.empty(0, dtype="<u4")


def token_array(tokens: Tokens) -> np.ndarray:
    """Tokens as a contiguous little-endian uint32 array (a view when possible)."""
    torch = sys.modules.get("torch")  # not loaded: tokens cannot be a tensor
    if torch is not None and isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TokenError(f"token ids must be integers, got a {tokens.dtype} tensor")
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, list | tuple) and _U32.itemsize == 4:
        converted = token_list(tokens) if len(tokens) >= 64 else None
        if converted is not None:
            return converted
        try:  # a list of ints straight to uint32, 4x faster than through numpy's int64
            return np.frombuffer(array.array("I", tokens), dtype="<u4") if tokens else _NONE
        except OverflowError:
            raise TokenError("token ids must lie in [0, 2**32)") from None
        except TypeError:
            raise TokenError("token ids must be integers") from None
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise TokenError(f"tokens must be a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype="<u4")
    if arr.dtype.kind not in "iu":
        raise TokenError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype != np.dtype("<u4"):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= 1 << 32:
            raise TokenError(f"token ids must lie in [0, 2**32), got range [{lo}, {hi}]")
        arr = arr.astype("<u4")
    return np.ascontiguousarray(arr)


def leading(flags: Iterable[object]) -> int:
    """How many leading ``flags`` are true: a prompt's hits, which end at the
    first miss because a block is useless without every block before it."""
    n = 0
    for f in flags:
        if not f:
            break
        n += 1
    return n


def check_per_key(n: int, **parts: Sized | None) -> None:
    """Every per-key part of a batch of ``n`` keys (payloads, parents, sizes,
    destinations...) has one item per key; ``None`` parts are absent."""
    for name, part in parts.items():
        if part is not None and len(part) != n:
            raise InvalidArgumentError(f"{n} keys but {len(part)} {name.replace('_', ' ')}")


def named_key(name: str) -> BlockKey:
    """The block key of an engine's own key string (SGLang's page hashes,
    LMCache's chunk keys): their hashes already chain prefixes."""
    return hashlib.blake2b(name.encode(), digest_size=KEY_BYTES).digest()


def salted_root(namespace: Namespace, salt: bytes) -> BlockKey | None:
    """Where the key chain of a prompt with ``salt`` starts (None: no salt,
    the namespace root). Two salts never share a key, nor with no salt."""
    if not salt:
        return None
    return hashlib.sha256(namespace.root + b"kvstore-salt\0" + salt).digest()[:KEY_BYTES]


def block_keys(
    namespace: Namespace, tokens: Tokens, *, start: BlockKey | None = None, scoped: bool = False
) -> list[BlockKey]:
    """Keys of every full block of ``tokens``; a partial trailing block gets none.

    ``start`` continues a chain from a known key instead of the namespace root
    (for keying a suffix whose prefix was keyed before). ``scoped``: each key
    as the store indexes it (``ScopedKey``: the namespace's tag first), made
    in the same C pass, for a node that looks a prompt up as it arrives.
    """
    arr = token_array(tokens)
    bs = namespace.layout.block_size
    n = arr.size // bs
    prev = namespace.root if start is None else start
    if n == 0:
        return []
    prefix = namespace.tag.to_bytes(4, "little") if scoped else b""
    packed = chain_keys(prev, arr, n, bs * 4, prefix)
    if packed is not None:
        return split_keys(packed, len(prefix) + KEY_BYTES)
    keys = python_block_keys(prev, arr[: n * bs].tobytes(), bs * 4)
    return [prefix + k for k in keys] if scoped else keys


def split_keys(packed: bytes, width: int = KEY_BYTES) -> list[bytes]:
    """``packed`` cut into ``width``-byte keys (its length a multiple of it),
    in one C pass: a raw item's ``tolist`` is bytes, trailing zeros kept."""
    return list(np.frombuffer(packed, dtype=f"V{width}").tolist())


def python_block_keys(start: BlockKey, data: bytes, step: int) -> list[BlockKey]:
    """The chain of keys over ``data`` cut in ``step``-byte blocks, in
    Python: the reference ``native.keys`` is tested against, and the
    fallback where it cannot be built."""
    prev = start
    out: list[BlockKey] = []
    append = out.append
    sha = hashlib.sha256
    for off in range(0, len(data) - step + 1, step):
        prev = sha(prev + data[off : off + step]).digest()[:KEY_BYTES]
        append(prev)
    return out
