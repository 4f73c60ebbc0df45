"""Configuration: one frozen dataclass per component, loaded in one place.

Sources, later ones winning: built-in defaults < TOML file < environment
(``KVSTORE_<SECTION>_<FIELD>``, e.g. ``KVSTORE_DRAM_CAPACITY=8GiB``) < explicit
overrides (CLI flags, keyword arguments). Sizes accept units (``512MiB``).
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from kvstore.directory_url import parse_directory_url
from kvstore.errors import ConfigError
from kvstore.eviction import DEFAULT_POLICY, make_admission, make_policy
from kvstore.units import format_size, parse_size
from transfer.config import TransferConfig

log = logging.getLogger(__name__)


def check_directory_url(url: str) -> str:
    """``url`` checked, as it may be shown: with any password masked (it ends
    up in logs, errors and a node's Stats)."""
    return parse_directory_url(url).shown


MiB = 1 << 20
GiB = 1 << 30

_SIZE_FIELDS = {
    "capacity",
    "page_size",
    "segment_size",
    "max_message",
    "inline_max",
    "stream_max",
    "pull_part",
    "stream_min_bytes",
    "scratch_memory",
}
DEFAULT_PORT = 50061


def default_dram_capacity() -> int:
    """A quarter of available memory, capped at 4 GiB and at least 64 MiB."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable")
            )
    except (OSError, StopIteration):
        avail = 4 * GiB
    return max(64 * MiB, min(avail // 4, 4 * GiB))


def default_data_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvstore"


def pool_page_size(capacity: int, page_size: int) -> int:
    """``page_size``, or for 0 the power of two near capacity/64 within [1, 64] MiB."""
    if page_size:
        return page_size
    target = max(MiB, min(64 * MiB, capacity // 64))
    return 1 << (target.bit_length() - 1)


def _check_page_size(section: str, page_size: int) -> None:
    if page_size and (page_size & (page_size - 1) or page_size < 4096):
        raise ConfigError(f"{section}.page_size must be a power of two >= 4096, got {page_size}")


@dataclass(frozen=True)
class HbmConfig:
    """The GPU-memory tier above DRAM (capacity 0: none, the default).

    It exists only on a host with a CUDA GPU: asking for it elsewhere is an
    error, never a stand-in. In-process writes land in it first; under
    pressure its coldest blocks move down to DRAM. ``page_size`` 0 picks
    capacity/64 within [1, 64] MiB.
    """

    capacity: int = 0
    device: str = "cuda"
    page_size: int = 0

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise ConfigError(f"hbm.capacity must be >= 0, got {self.capacity}")
        if not (self.device == "cuda" or self.device.startswith("cuda:")):
            raise ConfigError(f"hbm.device must be 'cuda' or 'cuda:N', got {self.device!r}")
        _check_page_size("hbm", self.page_size)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def effective_page_size(self) -> int:
        return pool_page_size(self.capacity, self.page_size)


@dataclass(frozen=True)
class DramConfig:
    """The host-memory pool. ``page_size`` 0 picks capacity/64 within [1, 64] MiB."""

    capacity: int = field(default_factory=default_dram_capacity)
    page_size: int = 0
    high_watermark: float = 0.90
    low_watermark: float = 0.75
    prefault: bool = True
    hugepages: bool = True

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ConfigError(f"dram.capacity must be > 0, got {self.capacity}")
        if not 0.0 < self.low_watermark < self.high_watermark <= 1.0:
            raise ConfigError(
                "need 0 < dram.low_watermark < dram.high_watermark <= 1, got "
                f"{self.low_watermark} and {self.high_watermark}"
            )
        _check_page_size("dram", self.page_size)
        if self.capacity < self.effective_page_size:
            raise ConfigError(
                f"dram.capacity {format_size(self.capacity)} is smaller than one page "
                f"({format_size(self.effective_page_size)}): give at least that, with a unit "
                "(e.g. 8GiB)"
            )

    @property
    def effective_page_size(self) -> int:
        return pool_page_size(self.capacity, self.page_size)


@dataclass(frozen=True)
class SsdConfig:
    """The SSD tier: append-only segment files under ``path`` (None: no SSD tier)."""

    path: Path | None = None
    capacity: int = 64 * GiB
    segment_size: int = 256 * MiB
    compression: str = "none"
    sync_writes: bool = False
    compact_garbage_ratio: float = 0.5
    flush_on_close: bool = True  # write DRAM-only blocks to SSD at close

    def __post_init__(self) -> None:
        if self.path is not None and not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path).expanduser())
        if self.capacity <= 0 or self.segment_size < 64 * 1024:
            raise ConfigError("ssd.capacity must be > 0 and ssd.segment_size >= 64KiB")
        if self.compression not in ("none", "lz4"):
            raise ConfigError(f"ssd.compression must be 'none' or 'lz4', got {self.compression!r}")
        if not 0.0 < self.compact_garbage_ratio <= 1.0:
            raise ConfigError("ssd.compact_garbage_ratio must lie in (0, 1]")

    @property
    def enabled(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC service of ``kvstore serve``.

    Without any token the node trusts every caller, so it binds 127.0.0.1
    unless ``host`` says otherwise. ``token`` grants every tenant (operators);
    ``tenant_tokens`` maps a tenant to the token that grants it alone.
    Batches ride the data port (``data_port``; 0 picks a free one, -1 opens
    none) in calls of at most ``stream_max`` payload bytes: request, reply
    and bytes in one round trip on a plain socket (over shm and ucx, a batch
    past 16 MiB takes the transfer engine instead). Without a port, batches
    past ``inline_max`` bytes move over the engine, smaller ones ride in the
    gRPC message. With ``pull_part`` an engine put is
    pulled in parts of that many bytes, each checksummed while the next
    crosses (for a node with cores to spare; on two cores it measured no
    faster, docs/performance.md); 0 pulls a batch whole. ``scratch_memory``
    bounds the host buffers calls allocate beside the pool (SSD reads,
    SSD-bound puts), all calls together: a call that needs more than is
    free is refused before a byte moves.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str = ""
    tenant_tokens: dict[str, str] = field(default_factory=dict)
    max_message: int = 64 * MiB
    inline_max: int = 1 * MiB
    data_port: int = 0
    stream_max: int = 256 * MiB
    pull_part: int = 0
    workers: int = 16
    scratch_memory: int = 256 * MiB
    grace: float = 10.0  # seconds in-flight calls get at shutdown
    node: str = ""  # name in Lookup answers and stats; default host:port

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"server.port {self.port} is not in 0..65535")
        if not -1 <= self.data_port < 65536:
            raise ConfigError(f"server.data_port {self.data_port} is not in -1..65535")
        if self.stream_max < 64 << 10:
            raise ConfigError(f"server.stream_max must be >= 64KiB, got {self.stream_max}")
        if self.pull_part and self.pull_part < 64 << 10:
            raise ConfigError(f"server.pull_part must be 0 or >= 64KiB, got {self.pull_part}")
        if self.max_message < MiB:
            raise ConfigError(f"server.max_message must be >= 1MiB, got {self.max_message}")
        if not 0 <= self.inline_max <= self.max_message // 2:
            raise ConfigError("server.inline_max must lie in [0, server.max_message / 2]")
        if self.scratch_memory < MiB:
            raise ConfigError(f"server.scratch_memory must be >= 1MiB, got {self.scratch_memory}")
        if self.workers < 1 or self.grace < 0:
            raise ConfigError("server.workers must be >= 1 and server.grace >= 0")
        for tenant, tok in self.tenant_tokens.items():
            if not tenant or not tok:
                raise ConfigError("server.tenant_tokens needs a non-empty tenant and token each")

    @property
    def secured(self) -> bool:
        return bool(self.token or self.tenant_tokens)


@dataclass(frozen=True)
class ClusterConfig:
    """Cluster membership of ``kvstore serve`` (no ``redis``: the node is alone).

    The node announces itself every ``heartbeat`` seconds; a node silent for
    ``ttl`` seconds is dead to readers. ``advertise`` is the host:port clients
    reach its gRPC service on (default: the bind address, or this machine's
    name when binding every interface); ``host`` names the machine for
    locality (default: this machine's name).
    """

    redis: str = ""
    heartbeat: float = 1.0
    ttl: float = 3.0
    advertise: str = ""
    host: str = ""
    prefix: str = "kvstore"

    def __post_init__(self) -> None:
        if self.heartbeat <= 0 or self.ttl < 2 * self.heartbeat:
            raise ConfigError(
                f"need cluster.heartbeat > 0 and cluster.ttl >= 2 x heartbeat, got "
                f"{self.heartbeat} and {self.ttl}"
            )
        if self.redis:
            check_directory_url(self.redis)

    @property
    def enabled(self) -> bool:
        return bool(self.redis)


@dataclass(frozen=True)
class MetricsConfig:
    """What a node measures beyond its basic counters, and where it serves them.

    ``enabled`` adds lookup accounting by prefix shape and namespace, RPC
    latency histograms and transfer byte counts (all under locks the node
    already takes). ``port``: the Prometheus ``/metrics`` endpoint of
    ``kvstore serve`` (-1: none, 0: a free port), bound to ``host``.
    """

    enabled: bool = True
    port: int = -1
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not -1 <= self.port < 65536:
            raise ConfigError(f"metrics.port {self.port} is not in -1..65535")


@dataclass(frozen=True)
class StoreConfig:
    """A node's whole config: its tiers, and (for ``kvstore serve``) its
    service and transfer engine, which an embedded store ignores."""

    hbm: HbmConfig = field(default_factory=HbmConfig)
    dram: DramConfig = field(default_factory=DramConfig)
    ssd: SsdConfig = field(default_factory=SsdConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eviction: str = DEFAULT_POLICY
    admission: str = "all"
    promote_on_hit: bool = True
    verify_dram_reads: bool = False  # checksum DRAM copies on every read (see docs/reliability.md)

    def __post_init__(self) -> None:
        make_policy(self.eviction)  # unknown names fail here, as ConfigError
        make_admission(self.admission)

    @classmethod
    def load(
        cls,
        toml_path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> StoreConfig:
        """Merge ``defaults``, a TOML file, ``KVSTORE_*`` env vars and dotted overrides.

        Override keys are dotted (``"dram.capacity"``, ``"eviction"``); None values
        are ignored so argparse results can be passed straight through.
        """
        flat: dict[str, Any] = dict(defaults or {})
        if toml_path is not None:
            try:
                with open(toml_path, "rb") as f:
                    doc = tomllib.load(f)
            except OSError as e:
                raise ConfigError(f"cannot read config file {toml_path}: {e}") from None
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(
                    f"config file {toml_path} is not TOML ({e}); kvstore reads TOML, "
                    'e.g. a [dram] table holding capacity = "8GiB"'
                ) from None
            for k, v in doc.items():
                if isinstance(v, dict):
                    flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
                else:
                    flat[k] = v
        flat.update(_from_env(env or {}))
        flat.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return _build(flat)


_SECTIONS: dict[str, Any] = {
    "hbm": HbmConfig,
    "dram": DramConfig,
    "ssd": SsdConfig,
    "server": ServerConfig,
    "transfer": TransferConfig,
    "cluster": ClusterConfig,
    "metrics": MetricsConfig,
}


# KVSTORE_* variables that are not config fields: the client's and the CLI's,
# the native build's, and the test suite's knobs
OTHER_VARS = frozenset({
    "KVSTORE_URL", "KVSTORE_TOKEN", "KVSTORE_CONFIG", "KVSTORE_NATIVE", "KVSTORE_NATIVE_CACHE",
    "KVSTORE_NATIVE_CUDA", "KVSTORE_FUZZ_EXAMPLES", "KVSTORE_FAULT_REPEATS",
})  # fmt: skip
DEPRECATED_VARS = {"KVSTORE_SERVER_TOKEN": "KVSTORE_TOKEN"}  # old name -> the one to use


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    """Config keys from ``KVSTORE_<SECTION>_<FIELD>`` variables. A variable
    that names nothing is refused, as an unknown TOML key is: a typo would
    otherwise be ignored in silence. ``KVSTORE_TOKEN`` is the node's token
    too (``DEPRECATED_VARS``), so that one variable serves every command."""
    by_var = {"KVSTORE_" + k.replace(".", "_").upper(): k for k in _known_keys()}
    out: dict[str, str] = {}
    for var in sorted(v for v in env if v.startswith("KVSTORE_")):
        if var in by_var:
            out[by_var[var]] = env[var]
        elif var not in OTHER_VARS:
            near = difflib.get_close_matches(var, [*by_var, *OTHER_VARS], n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"unknown environment variable {var}{hint}")
    for old, new in DEPRECATED_VARS.items():  # the new name sets what the old one did
        if old in env:
            log.warning("%s is deprecated: set %s instead", old, new)
        elif new in env:
            out[by_var[old]] = env[new]
    return out


def _known_keys() -> list[str]:
    keys = [f"{sec}.{f.name}" for sec, cls in _SECTIONS.items() for f in fields(cls)]
    return keys + [f.name for f in fields(StoreConfig) if f.name not in _SECTIONS]


def _coerce(name: str, value: Any, default: Any) -> Any:
    """``value`` (from TOML, an env var or a flag) in the type of ``default``."""
    short = name.rsplit(".", 1)[-1]
    if short in _SIZE_FIELDS:
        return parse_size(value, what=name)
    if short == "path":
        return None if value in ("", "none", None) else Path(str(value)).expanduser()
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected a boolean, got {value!r}")
    if isinstance(default, dict):
        return _mapping(name, value)
    if isinstance(default, int | float):
        try:
            return type(default)(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    return str(value)


def _mapping(name: str, value: Any) -> dict[str, str]:
    """A TOML table, or ``"a=x,b=y"`` from an env var or flag."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in str(value).split(","))):
        k, sep, v = item.partition("=")
        if not sep:
            raise ConfigError(f"{name}: expected key=value pairs, got {item!r}")
        out[k.strip()] = v.strip()
    return out


def _build(flat: Mapping[str, Any]) -> StoreConfig:
    known = set(_known_keys())
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ConfigError(
            f"unknown config keys: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    base = StoreConfig()
    top: dict[str, Any] = {}
    for section in _SECTIONS:
        current = getattr(base, section)
        sub = {
            k.split(".", 1)[1]: _coerce(k, v, getattr(current, k.split(".", 1)[1]))
            for k, v in flat.items()
            if k.startswith(section + ".")
        }
        if section == "dram" and "capacity" not in sub:
            sub["capacity"] = current.capacity
        top[section] = replace(current, **sub)
    for k, v in flat.items():
        if "." not in k:
            top[k] = _coerce(k, v, getattr(base, k))
    return replace(base, **top)
