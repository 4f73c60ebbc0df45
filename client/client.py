"""The client an inference engine embeds: tokens and KV tensors in, prefix hits out.

A client is bound to one namespace (model, KV layout, tenant), so engine code
speaks only in tokens and tensors; keys, checksums and tiers stay below it.
``Client.local`` runs the store in-process and ``Client.connect`` talks to a
node over gRPC; both give the same API, so engine code does not change with
the transport.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch

from client.blockstore import BlockStore, Locator, TokenLookup
from client.staging import Staging
from kvstore.buffers import Payload, as_tensor
from kvstore.cluster.directory import Holder
from kvstore.config import StoreConfig
from kvstore.directory_url import SCHEMES as DIRECTORY_SCHEMES
from kvstore.errors import InvalidArgumentError, LayoutError, PayloadSizeError
from kvstore.keys import (
    BlockKey,
    Namespace,
    Tokens,
    block_keys,
    leading,
    salted_root,
    token_array,
)
from kvstore.stats import StoreStats
from kvstore.store import TieredStore
from native import PagedKV, gather_blocks, scatter_blocks
from transfer import TransferConfig

KV = torch.Tensor | Sequence[Payload]
PagedCaches = PagedKV | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
BlockIds = Sequence[int] | torch.Tensor


class Client:
    def __init__(
        self,
        store: BlockStore,
        namespace: Namespace,
        *,
        compression: str | None = None,
        owns_store: bool = False,
    ) -> None:
        if compression not in (None, "none", "lz4"):
            raise InvalidArgumentError(f"compression must be 'none' or 'lz4', got {compression!r}")
        self.store = store
        self.namespace = namespace
        self.layout = namespace.layout
        self._compress = None if compression is None else compression == "lz4"
        self._owns_store = owns_store
        self._tag = namespace.tag
        self._staging = Staging(store.alloc)
        self._staging_lock = threading.Lock()
        try:
            store.open_namespace(namespace)
        except BaseException:
            if owns_store:
                store.close()
            raise

    @classmethod
    def local(
        cls,
        config: StoreConfig | None = None,
        *,
        namespace: Namespace,
        compression: str | None = None,
    ) -> Client:
        """A client over a store of its own in this process (closed with it)."""
        return cls(TieredStore(config), namespace, compression=compression, owns_store=True)

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        namespace: Namespace,
        token: str | None = None,
        transfer: TransferConfig | str | None = None,
        compression: str | None = None,
        replicas: int = 1,
    ) -> Client:
        """A client of the node at ``kvstore://host:port`` (``kvstore serve``),
        or of the cluster whose directory is at ``redis://host:port/db``
        (``redis+sentinel://...`` or ``redis+cluster://...``: docs/cluster.md).

        ``token`` (default: the ``KVSTORE_TOKEN`` env var) must grant the
        namespace's tenant when the nodes have tokens. Large batches move over
        a transfer engine of the node's backend (``transfer`` overrides its
        config; "none" keeps every payload in gRPC messages). ``replicas``: in
        a cluster, how many nodes each put stores a block on.
        """
        store: BlockStore
        if url.split("://", 1)[0] in DIRECTORY_SCHEMES:
            from client.cluster import ClusterStore
            from kvstore.cluster.redis_directory import RedisDirectory

            directory = RedisDirectory(url)
            store = ClusterStore(directory, token=token, transfer=transfer, replicas=replicas)
        else:
            from client.remote import RemoteStore

            store = RemoteStore(url, token=token, transfer=transfer)
        return cls(store, namespace, compression=compression, owns_store=True)

    def with_namespace(self, namespace: Namespace, *, compression: str | None = None) -> Client:
        """Another client on the same store for another model or tenant."""
        return Client(self.store, namespace, compression=compression)

    # -- prompt-level API ----------------------------------------------------

    def keys(self, tokens: Tokens, *, salt: bytes = b"") -> list[BlockKey]:
        """The block keys of ``tokens``. A ``salt`` (what else the KV depends
        on: an adapter, a cache salt, images) gives the prompt its own chain."""
        return block_keys(self.namespace, tokens, start=salted_root(self.namespace, salt))

    def lookup(self, tokens: Tokens, *, salt: bytes = b"") -> int:
        """How many leading tokens of ``tokens`` are cached (whole blocks only)."""
        start = salted_root(self.namespace, salt)
        if isinstance(self.store, TokenLookup):
            hits = self.store.lookup_tokens(token_array(tokens), start=start, ns_tag=self._tag)
        else:
            hits = self.store.lookup(
                block_keys(self.namespace, tokens, start=start), ns_tag=self._tag
            )
        return hits * self.layout.block_size

    def locate(self, tokens: Tokens, *, salt: bytes = b"") -> list[Holder]:
        """Which nodes hold how much of ``tokens`` (leading whole blocks), and
        in which tier: most tokens first. For a router placing a request
        where its prefix already is; not counted as a lookup."""
        if not isinstance(self.store, Locator):
            raise InvalidArgumentError(
                f"a {type(self.store).__name__} cannot say which nodes hold blocks: "
                "connect to a node (kvstore://) or a cluster (redis://...)"
            )
        return self.store.holders(token_array(tokens), salt=salt, ns_tag=self._tag)

    def loadable(self, tokens: Tokens, *, salt: bytes = b"") -> int:
        """The cached leading tokens a prompt can load: ``lookup`` capped so
        the prompt's last token stays to compute (its logits start decoding)."""
        bs = self.layout.block_size
        return min(self.lookup(tokens, salt=salt), max(0, (len(tokens) - 1) // bs * bs))

    def put(self, tokens: Tokens, kv: KV) -> int:
        """Store the KV of every full block of ``tokens``; returns tokens stored.

        ``kv`` is a tensor shaped ``layout.prompt_shape(n)`` with n at least the
        full-block token count, or a sequence of per-block payloads.
        """
        keys = self.keys(tokens)
        payloads = self._blocks_of(kv, len(keys))
        parents: list[BlockKey | None] = [None, *keys[:-1]]
        self.store.put(keys, payloads, parents, ns_tag=self._tag, compress=self._compress)
        return len(keys) * self.layout.block_size

    def get(self, tokens: Tokens, into: KV) -> int:
        """Fill ``into`` with the cached prefix of ``tokens``; returns tokens filled.

        Reads stop at the first block not cached; the rest of ``into`` is untouched
        (or, after a damaged block, undefined).
        """
        keys = self.keys(tokens)
        dsts = self._blocks_of(into, len(keys), writable=True)
        hits = self.store.get_into(keys, dsts, prefix=True, ns_tag=self._tag)
        return leading(hits) * self.layout.block_size

    # -- paged API (an engine's own KV cache) ------------------------------------

    def put_paged(
        self, tokens: Tokens, kv_caches: PagedCaches, block_ids: BlockIds, *, salt: bytes = b""
    ) -> int:
        """Store every full block of ``tokens`` straight from an engine's paged
        caches (per layer ``[2, blocks, block_size, heads, head_dim]`` or MLA's
        ``[blocks, block_size, head_dim]``); ``block_ids`` is the request's
        block table. Blocks the store already has are not copied. Returns the
        tokens the store now covers."""
        keys = self.keys(tokens, salt=salt)
        kv, ids = self._paged(kv_caches, block_ids, len(keys))
        have = self.store.lookup(keys, ns_tag=self._tag)
        todo = keys[have:]
        if todo:
            with self._staging_lock:
                buf = self._staging.take(len(todo) * kv.block_nbytes, pin=kv.device.type == "cuda")
                gather_blocks(kv, ids[have:], buf).wait()
                parents: list[BlockKey | None] = [keys[have - 1] if have else None, *todo[:-1]]
                payloads = list(buf.view(len(todo), kv.block_nbytes))
                self.store.put(todo, payloads, parents, ns_tag=self._tag, compress=self._compress)
        return len(keys) * self.layout.block_size

    def get_paged(
        self,
        tokens: Tokens,
        kv_caches: PagedCaches,
        block_ids: BlockIds,
        *,
        start: int = 0,
        salt: bytes = b"",
    ) -> int:
        """Fill the engine's blocks ``block_ids`` with the cached prefix of
        ``tokens``; returns the tokens the engine now holds (``start`` plus
        those filled). Tokens before ``start`` (whole blocks: the engine's own
        prefix cache) are taken as present and their blocks are neither read
        nor written. Blocks past the first miss are not touched; the ids of
        the blocks filled must be distinct."""
        bs = self.layout.block_size
        if start < 0 or start % bs:
            raise InvalidArgumentError(f"start must be a whole number of blocks, got {start}")
        keys = self.keys(tokens, salt=salt)
        first = start // bs
        kv, ids = self._paged(kv_caches, block_ids, len(keys))
        if first >= len(keys):
            return min(start, len(keys) * bs)
        kv.block_ids(ids[first:], unique=True)
        todo = keys[first:]
        with self._staging_lock:
            buf = self._staging.take(len(todo) * kv.block_nbytes, pin=kv.device.type == "cuda")
            dsts = list(buf.view(len(todo), kv.block_nbytes))
            hits = leading(self.store.get_into(todo, dsts, prefix=True, ns_tag=self._tag))
            if hits:
                scatter_blocks(buf[: hits * kv.block_nbytes], kv, ids[first : first + hits]).wait()
        return (first + hits) * bs

    def _paged(
        self, kv_caches: PagedCaches, block_ids: BlockIds, num_blocks: int
    ) -> tuple[PagedKV, torch.Tensor]:
        """The caches, checked against this namespace's layout, and the first
        ``num_blocks`` block ids, checked against the caches."""
        kv = PagedKV.of(kv_caches)
        want = self.layout
        if kv.block_shape != want.block_shape or kv.dtype != want.torch_dtype:
            raise LayoutError(
                f"the engine's caches hold blocks of {kv.dtype}{kv.block_shape}, the namespace's "
                f"layout is {want.torch_dtype}{want.block_shape} (layers, kv, block_size, heads, "
                "head_dim)"
            )
        ids = kv.block_ids(block_ids, unique=False)
        if ids.numel() < num_blocks:
            raise InvalidArgumentError(
                f"{num_blocks} full blocks of tokens but a block table of {ids.numel()}"
            )
        ids = ids[:num_blocks]
        return kv, ids

    # -- block-level API -------------------------------------------------------

    def put_blocks(
        self,
        keys: Sequence[BlockKey],
        payloads: Sequence[Payload],
        parents: Sequence[BlockKey | None] | None = None,
    ) -> list[bool]:
        """Store blocks by key; True where newly stored."""
        self._check_block_sizes(payloads)
        return self.store.put(keys, payloads, parents, ns_tag=self._tag, compress=self._compress)

    def get_blocks(
        self, keys: Sequence[BlockKey], buffers: Sequence[Payload], *, prefix: bool = False
    ) -> list[bool]:
        """Fill buffers by key; True where filled."""
        return self.store.get_into(keys, buffers, prefix=prefix, ns_tag=self._tag)

    def exists(self, keys: Sequence[BlockKey]) -> list[bool]:
        return self.store.exists(keys, ns_tag=self._tag)

    def delete(self, keys: Sequence[BlockKey]) -> int:
        return self.store.delete(keys, ns_tag=self._tag)

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer blocks move into and out of fastest (for a remote
        node: registered with the transfer engine, so no bounce copy)."""
        return self.store.alloc(nbytes)

    def stats(self) -> StoreStats:
        return self.store.stats()

    def close(self) -> None:
        with self._staging_lock:
            self._staging.release()
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------

    def _blocks_of(self, kv: KV, num_blocks: int, *, writable: bool = False) -> list[Payload]:
        if isinstance(kv, torch.Tensor):
            return list(self.layout.block_slices(kv, num_blocks))
        blocks = list(kv)
        if len(blocks) < num_blocks:
            raise InvalidArgumentError(f"{num_blocks} full blocks but only {len(blocks)} buffers")
        blocks = blocks[:num_blocks]
        self._check_block_sizes(blocks, writable=writable)
        return blocks

    def _check_block_sizes(self, payloads: Sequence[Payload], *, writable: bool = False) -> None:
        want = self.layout.block_nbytes
        for i, p in enumerate(payloads):
            # a CPU tensor is checked here by size alone; the store checks its device
            got = p.nbytes if type(p) is torch.Tensor else as_tensor(p, writable=writable).nbytes
            if got != want:
                raise PayloadSizeError(want, got, what=f"block {i}")
