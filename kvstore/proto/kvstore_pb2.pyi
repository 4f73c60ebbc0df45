from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_DEFAULT: _ClassVar[Compression]
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_LZ4: _ClassVar[Compression]

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_NONE: _ClassVar[Tier]
    TIER_DRAM: _ClassVar[Tier]
    TIER_SSD: _ClassVar[Tier]
    TIER_HBM: _ClassVar[Tier]
COMPRESSION_DEFAULT: Compression
COMPRESSION_NONE: Compression
COMPRESSION_LZ4: Compression
TIER_NONE: Tier
TIER_DRAM: Tier
TIER_SSD: Tier
TIER_HBM: Tier

class NamespaceSpec(_message.Message):
    __slots__ = ("model", "tenant", "layout_json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    tenant: str
    layout_json: str
    def __init__(self, model: _Optional[str] = ..., tenant: _Optional[str] = ..., layout_json: _Optional[str] = ...) -> None: ...

class OpenNamespaceRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: NamespaceSpec
    def __init__(self, spec: _Optional[_Union[NamespaceSpec, _Mapping]] = ...) -> None: ...

class OpenNamespaceReply(_message.Message):
    __slots__ = ("namespace_id", "block_nbytes", "name")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_NBYTES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    block_nbytes: int
    name: str
    def __init__(self, namespace_id: _Optional[bytes] = ..., block_nbytes: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("endpoint", "region_id", "nbytes", "shm_name", "shm_offset", "key")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    region_id: int
    nbytes: int
    shm_name: str
    shm_offset: int
    key: str
    def __init__(self, endpoint: _Optional[str] = ..., region_id: _Optional[int] = ..., nbytes: _Optional[int] = ..., shm_name: _Optional[str] = ..., shm_offset: _Optional[int] = ..., key: _Optional[str] = ...) -> None: ...

class BlockRefs(_message.Message):
    __slots__ = ("regions", "region_index", "offsets")
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    REGION_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    region_index: _containers.RepeatedScalarFieldContainer[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ..., region_index: _Optional[_Iterable[int]] = ..., offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("namespace_id", "keys", "parents", "sizes", "checksums", "inline", "refs", "compression")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    REFS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: bytes
    parents: bytes
    sizes: _containers.RepeatedScalarFieldContainer[int]
    checksums: _containers.RepeatedScalarFieldContainer[int]
    inline: bytes
    refs: BlockRefs
    compression: Compression
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[bytes] = ..., parents: _Optional[bytes] = ..., sizes: _Optional[_Iterable[int]] = ..., checksums: _Optional[_Iterable[int]] = ..., inline: _Optional[bytes] = ..., refs: _Optional[_Union[BlockRefs, _Mapping]] = ..., compression: _Optional[_Union[Compression, str]] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: bytes
    def __init__(self, stored: _Optional[bytes] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace_id", "keys", "prefix", "sizes", "dest")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    DEST_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: bytes
    prefix: bool
    sizes: _containers.RepeatedScalarFieldContainer[int]
    dest: BlockRefs
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[bytes] = ..., prefix: _Optional[bool] = ..., sizes: _Optional[_Iterable[int]] = ..., dest: _Optional[_Union[BlockRefs, _Mapping]] = ...) -> None: ...

class GetReply(_message.Message):
    __slots__ = ("first", "found", "sizes", "checksums", "inline")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    first: int
    found: bytes
    sizes: _containers.RepeatedScalarFieldContainer[int]
    checksums: _containers.RepeatedScalarFieldContainer[int]
    inline: bytes
    def __init__(self, first: _Optional[int] = ..., found: _Optional[bytes] = ..., sizes: _Optional[_Iterable[int]] = ..., checksums: _Optional[_Iterable[int]] = ..., inline: _Optional[bytes] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("namespace_id", "keys", "tokens", "start")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: bytes
    tokens: bytes
    start: bytes
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[bytes] = ..., tokens: _Optional[bytes] = ..., start: _Optional[bytes] = ...) -> None: ...

class LookupReply(_message.Message):
    __slots__ = ("hit_blocks", "hit_tokens", "tiers", "node")
    HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    hit_blocks: int
    hit_tokens: int
    tiers: bytes
    node: str
    def __init__(self, hit_blocks: _Optional[int] = ..., hit_tokens: _Optional[int] = ..., tiers: _Optional[bytes] = ..., node: _Optional[str] = ...) -> None: ...

class LocateRequest(_message.Message):
    __slots__ = ("namespace_id", "tokens", "salt")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    tokens: bytes
    salt: bytes
    def __init__(self, namespace_id: _Optional[bytes] = ..., tokens: _Optional[bytes] = ..., salt: _Optional[bytes] = ...) -> None: ...

class Holder(_message.Message):
    __slots__ = ("node", "url", "host", "tiers")
    NODE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    node: str
    url: str
    host: str
    tiers: bytes
    def __init__(self, node: _Optional[str] = ..., url: _Optional[str] = ..., host: _Optional[str] = ..., tiers: _Optional[bytes] = ...) -> None: ...

class LocateReply(_message.Message):
    __slots__ = ("holders", "block_size")
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    holders: _containers.RepeatedCompositeFieldContainer[Holder]
    block_size: int
    def __init__(self, holders: _Optional[_Iterable[_Union[Holder, _Mapping]]] = ..., block_size: _Optional[int] = ...) -> None: ...

class KeysRequest(_message.Message):
    __slots__ = ("namespace_id", "keys")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: bytes
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[bytes] = ...) -> None: ...

class ExistsReply(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bytes
    def __init__(self, found: _Optional[bytes] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("status", "node", "version", "transfer_backend", "max_message", "inline_max", "uptime_s", "data_port", "stream_max")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[HealthReply.Status]
        SERVING: _ClassVar[HealthReply.Status]
        DRAINING: _ClassVar[HealthReply.Status]
    UNKNOWN: HealthReply.Status
    SERVING: HealthReply.Status
    DRAINING: HealthReply.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_BACKEND_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INLINE_MAX_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    STREAM_MAX_FIELD_NUMBER: _ClassVar[int]
    status: HealthReply.Status
    node: str
    version: str
    transfer_backend: str
    max_message: int
    inline_max: int
    uptime_s: float
    data_port: int
    stream_max: int
    def __init__(self, status: _Optional[_Union[HealthReply.Status, str]] = ..., node: _Optional[str] = ..., version: _Optional[str] = ..., transfer_backend: _Optional[str] = ..., max_message: _Optional[int] = ..., inline_max: _Optional[int] = ..., uptime_s: _Optional[float] = ..., data_port: _Optional[int] = ..., stream_max: _Optional[int] = ...) -> None: ...
