"""What the node and its remote clients share about the gRPC wire.

The method table is read from the proto's descriptor, so server handlers and
client stubs come from one list and cannot disagree; keys, flags, namespaces
and region descriptors are packed and checked here once for both sides.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kvstore.cluster.directory import Holder
from kvstore.errors import InvalidArgumentError, KVStoreError, LayoutError
from kvstore.keys import KEY_BYTES, BlockKey, Namespace, check_per_key, split_keys
from kvstore.layout import KVLayout
from kvstore.proto import kvstore_pb2 as pb
from kvstore.tier import Tier
from transfer.base import RegionDesc

SERVICE = "kvstore.v1.KVStore"
AUTH_HEADER = "authorization"  # "Bearer <token>"
ERROR_TYPE_HEADER = "kvstore-error"  # trailing metadata: the kvstore.errors class raised
STORED_HEADER = "kvstore-stored"  # trailing metadata of a partial put: leading blocks stored
MAX_KEYS = 1 << 20  # per call; a message limit binds long before this
NO_PARENT = bytes(KEY_BYTES)
MESSAGE_SLACK = 64 << 10  # room for everything but the payload in an inline message
TIER_CODES = {Tier.HBM: pb.TIER_HBM, Tier.DRAM: pb.TIER_DRAM, Tier.SSD: pb.TIER_SSD}  # LookupReply
TIER_NAMES = {code: name for name, code in TIER_CODES.items()}
# a put's ``compress`` (None: the node's default) as PutRequest.compression, and back
COMPRESSION_CODES = {
    None: pb.COMPRESSION_DEFAULT,
    False: pb.COMPRESSION_NONE,
    True: pb.COMPRESSION_LZ4,
}
COMPRESS_OF = {code: compress for compress, code in COMPRESSION_CODES.items()}
# While a call is in flight the client pings the node every second and gives
# up on the connection after a second without an answer: a node behind a cut
# link fails the call in about 2 s (UNAVAILABLE) instead of at its deadline.
KEEPALIVE_MS = 1000
CLIENT_KEEPALIVE = [
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_KEEPALIVE = [  # accept those pings, never answer them with GOAWAY
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
]


@dataclass(frozen=True)
class Method:
    name: str
    request: Any  # a generated message class
    reply: Any
    streaming: bool  # server streaming

    @property
    def path(self) -> str:
        return f"/{SERVICE}/{self.name}"


def _methods() -> dict[str, Method]:
    service = pb.DESCRIPTOR.services_by_name[SERVICE.rsplit(".", 1)[1]]
    return {
        m.name: Method(
            m.name,
            getattr(pb, m.input_type.name),
            getattr(pb, m.output_type.name),
            m.server_streaming,
        )
        for m in service.methods
    }


METHODS = _methods()


# -- keys and flags ------------------------------------------------------------


def pack_keys(keys: Sequence[BlockKey]) -> bytes:
    return b"".join(keys)


def unpack_keys(data: bytes, *, what: str = "keys") -> list[BlockKey]:
    if len(data) % KEY_BYTES:
        raise InvalidArgumentError(f"{what}: {len(data)} bytes is not a whole number of keys")
    n = len(data) // KEY_BYTES
    if n > MAX_KEYS:
        raise InvalidArgumentError(f"{what}: {n} keys in one call; at most {MAX_KEYS}")
    return split_keys(data)


def pack_parents(parents: Sequence[BlockKey | None] | None) -> bytes:
    return b"" if parents is None else b"".join(p or NO_PARENT for p in parents)


def unpack_parents(data: bytes, n: int) -> list[BlockKey | None] | None:
    if not data:
        return None
    keys = unpack_keys(data, what="parents")
    check_per_key(n, parents=keys)
    return [None if k == NO_PARENT else k for k in keys]


def pack_flags(flags: Sequence[bool]) -> bytes:
    return bytes(map(int, flags))


def unpack_flags(data: bytes) -> list[bool]:
    return [b != 0 for b in data]


# -- namespaces ----------------------------------------------------------------


def namespace_spec(ns: Namespace) -> pb.NamespaceSpec:
    return pb.NamespaceSpec(
        model=ns.model, tenant=ns.tenant, layout_json=json.dumps(asdict(ns.layout))
    )


def namespace_from_spec(spec: pb.NamespaceSpec) -> Namespace:
    try:
        fields = json.loads(spec.layout_json or "null")
    except json.JSONDecodeError as e:
        raise LayoutError(f"layout_json is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise LayoutError("layout_json must be a JSON object of KVLayout fields")
    try:
        layout = KVLayout(**fields)
    except TypeError as e:
        raise LayoutError(f"layout_json: {e}") from None
    return Namespace(spec.model, layout, spec.tenant or "default")


# -- region descriptors --------------------------------------------------------


def region_to_pb(desc: RegionDesc) -> pb.Region:
    return pb.Region(**desc.to_dict())


def region_from_pb(msg: pb.Region) -> RegionDesc:
    return RegionDesc.from_dict(
        {
            "endpoint": msg.endpoint,
            "region_id": msg.region_id,
            "nbytes": msg.nbytes,
            "key": msg.key,
            "shm_name": msg.shm_name,
            "shm_offset": msg.shm_offset,
        }
    )


def error_metadata(e: KVStoreError) -> tuple[tuple[str, str], ...]:
    md = [(ERROR_TYPE_HEADER, type(e).__name__)]
    stored = getattr(e, "stored", None)
    if isinstance(stored, int):
        md.append((STORED_HEADER, str(stored)))
    return tuple(md)


def locate_reply(holders: Sequence[Holder], block_size: int) -> Any:
    """``holders`` as a ``LocateReply``."""
    return pb.LocateReply(
        holders=[
            pb.Holder(
                node=h.node,
                url=h.url,
                host=h.host,
                tiers=bytes(map(TIER_CODES.__getitem__, h.tiers)),
            )
            for h in holders
        ],
        block_size=block_size,
    )


def reply_holders(reply: Any, url: str) -> list[Holder]:
    """A ``LocateReply`` as holders; an empty url is the answering node's, ``url``."""
    return [
        Holder(
            h.node, h.url or url, h.host, tuple(TIER_NAMES[t] for t in h.tiers), reply.block_size
        )
        for h in reply.holders
    ]
