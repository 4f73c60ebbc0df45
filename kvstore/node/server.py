"""A store node: the tiered store, its transfer engine and the gRPC server.

Every call goes through one wrapper: the request is parsed here (so garbage
bytes are INVALID_ARGUMENT, not a gRPC internal error), the caller's token
is checked, and a ``KVStoreError`` becomes its status code with the error's
class in trailing metadata (the remote client raises the same class).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from kvstore.cluster.directory import NodeInfo
from kvstore.cluster.membership import Membership
from kvstore.config import StoreConfig
from kvstore.errors import (
    ConfigError,
    InvalidArgumentError,
    KVStoreError,
    ListenError,
    NodeBusyError,
)
from kvstore.node.dataport import DataPortServer
from kvstore.node.metrics import MetricsServer
from kvstore.node.namespaces import FILE_NAME, NamespaceRegistry
from kvstore.node.service import KVStoreService
from kvstore.rpc import parse_url
from kvstore.store import TieredStore
from kvstore.tier import Tier
from kvstore.version import VERSION
from kvstore.wire import METHODS, SERVER_KEEPALIVE, SERVICE, Method, error_metadata
from transfer import TransferEngine, make_engine
from transfer.memory import Progress

log = logging.getLogger(__name__)

# Calls that move payloads wait on peers (a client's transfer engine); each
# holds a gRPC worker while it does. They get all workers but CONTROL_RESERVE,
# so a node whose data calls are stalled by dead or hostile peers still
# answers Health, Stats, Lookup and the rest at once.
DATA_METHODS = frozenset({"Put", "Get", "BatchGet"})
CONTROL_RESERVE = 4


class Node:
    """Start with ``Node(config)``; ``stop()`` drains calls, then closes the store."""

    def __init__(self, config: StoreConfig, *, progress: Progress | None = None) -> None:
        """``progress``: called as the DRAM pool is faulted in (a CLI's bar)."""
        sc = config.server
        if config.transfer.backend == "local":
            raise ConfigError(
                "transfer.backend 'local' cannot reach other processes: use tcp, shm or ucx"
            )
        if not sc.secured and not _is_loopback(sc.host):
            log.warning(
                "listening on %s without a token: any host that reaches it may read and write",
                sc.host,
            )
        self.config = config
        self.store = TieredStore(config, progress=progress)
        engine: TransferEngine | None = None
        try:
            engine = make_engine(config.transfer)
            path = config.ssd.path / FILE_NAME if config.ssd.path is not None else None
            registry = NamespaceRegistry(path)
            self._server = grpc.server(
                ThreadPoolExecutor(sc.workers, thread_name_prefix="kvstore-rpc"),
                options=[
                    ("grpc.max_receive_message_length", sc.max_message),
                    ("grpc.max_send_message_length", sc.max_message),
                    ("grpc.so_reuseport", 0),
                    *SERVER_KEEPALIVE,
                ],
            )
            try:  # grpcio returns 0, or (newer) raises, when it cannot bind
                self.port = self._server.add_insecure_port(f"{_bracket(sc.host)}:{sc.port}")
            except RuntimeError:
                self.port = 0
            if not self.port:
                raise ListenError(
                    f"{sc.host}:{sc.port}",
                    "cannot listen there: the port is in use or the address is not this host's "
                    "(pick another with --port, or 0 for a free one)",
                )
            self.address = f"{sc.host}:{self.port}"
            self.service = KVStoreService(
                self.store,
                engine,
                config,
                registry,
                sc.node or f"{socket.gethostname()}:{self.port}",
            )
        except BaseException:
            if engine is not None:
                engine.close()
            self.store.close()
            raise
        slots = max(1, sc.workers - CONTROL_RESERVE)
        self._data_slots = threading.BoundedSemaphore(slots)
        self._data_slot_count = slots
        handlers = {m.name: self._handler(m) for m in METHODS.values()}
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, handlers)]
        )
        self._server.start()
        self._stopped = False
        self.membership: Membership | None = None
        self.metrics: MetricsServer | None = None
        self.data_port: DataPortServer | None = None
        if sc.data_port >= 0:
            try:
                self.data_port = DataPortServer(
                    self.service, sc.host, sc.data_port, config.transfer.max_connections
                )
            except OSError as e:
                self.stop(grace=0)
                raise ListenError(
                    f"{sc.host}:{sc.data_port}",
                    f"cannot open the data port there ({e.strerror}): pick another with "
                    "--data-port, 0 for a free one, or -1 for none",
                ) from None
            self.service.data_port = self.data_port.port
        if config.metrics.port >= 0:
            try:
                self.metrics = MetricsServer(
                    self.service.snapshot, config.metrics.host, config.metrics.port
                )
            except OSError as e:
                self.stop(grace=0)
                raise ListenError(
                    f"{config.metrics.host}:{config.metrics.port}",
                    f"cannot serve /metrics there ({e.strerror}): pick another --metrics-port",
                ) from None
        if config.cluster.enabled:
            try:
                self.membership = self.service.membership = self._join(config)
            except BaseException:
                self.stop(grace=0)
                raise

    def _join(self, config: StoreConfig) -> Membership:
        from kvstore.cluster.redis_directory import RedisDirectory

        cc = config.cluster
        directory = RedisDirectory(cc.redis, prefix=cc.prefix, ttl=cc.ttl)
        host = config.server.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        url = f"kvstore://{cc.advertise or f'{_bracket(host)}:{self.port}'}"
        parse_url(url)  # a bad --advertise fails here, not on every client
        backend = self.service.engine.backend if self.service.engine else ""
        locality = cc.host or socket.gethostname()

        def info() -> NodeInfo:
            tiers = {t.name: t for t in self.store.stats().tiers}
            dram, ssd = tiers[Tier.DRAM], tiers.get(Tier.SSD)
            return NodeInfo(
                name=self.service.node,
                url=url,
                host=locality,
                backend=backend,
                dram_capacity=dram.capacity_bytes,
                dram_free=dram.capacity_bytes - dram.used_bytes,
                ssd_capacity=ssd.capacity_bytes if ssd else 0,
                ssd_free=ssd.capacity_bytes - ssd.used_bytes if ssd else 0,
                version=VERSION,
            )

        return Membership(self.store, directory, info, cc)

    @property
    def url(self) -> str:
        return f"kvstore://{self.address}"

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish (up to ``grace`` s), close."""
        if self._stopped:
            return
        self._stopped = True
        self.service.draining = True
        if self.membership is not None:
            self.membership.leave()  # readers stop coming here before the drain
        self._server.stop(self.config.server.grace if grace is None else grace).wait()
        if self.data_port is not None:
            self.data_port.close()
        if self.metrics is not None:
            self.metrics.close()
        self.service.close()
        self.store.close()

    def wait(self, timeout: float | None = None) -> bool:
        return bool(self._server.wait_for_termination(timeout))

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the one wrapper -------------------------------------------------------------

    def _handler(self, m: Method) -> grpc.RpcMethodHandler[bytes, bytes]:
        fn: Callable[[Any, Any], Any] = getattr(self.service, m.name)
        svc = self.service
        if m.name in DATA_METHODS:
            fn = self._with_data_slot(fn, streaming=m.streaming)

        def begin(raw: bytes, context: grpc.ServicerContext) -> tuple[Any, Any]:
            svc.counts.call(m.name)
            tenants = svc.auth.tenants_of(context.invocation_metadata())
            try:
                request = m.request.FromString(raw)
            except DecodeError as e:
                raise InvalidArgumentError(f"malformed {m.request.__name__}: {e}") from None
            return request, tenants

        def fail(context: grpc.ServicerContext, e: BaseException) -> None:
            if isinstance(e, KVStoreError):
                code, detail = e.grpc_code, str(e)
                context.set_trailing_metadata(error_metadata(e))
            else:
                log.exception("%s failed", m.name)
                code, detail = "INTERNAL", f"{type(e).__name__}: {e}"
            svc.counts.failed(m.name, code)
            context.abort(grpc.StatusCode[code], detail)

        if m.streaming:

            def stream(raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
                t0 = time.perf_counter()
                try:
                    request, tenants = begin(raw, context)
                    for reply in fn(request, tenants):
                        yield reply.SerializeToString()
                except Exception as e:
                    fail(context, e)
                finally:
                    svc.counts.observe(m.name, time.perf_counter() - t0)

            return grpc.unary_stream_rpc_method_handler(stream)

        def unary(raw: bytes, context: grpc.ServicerContext) -> bytes:
            t0 = time.perf_counter()
            try:
                request, tenants = begin(raw, context)
                return bytes(fn(request, tenants).SerializeToString())
            except Exception as e:
                fail(context, e)
                raise  # not reached: abort raised
            finally:
                svc.counts.observe(m.name, time.perf_counter() - t0)

        return grpc.unary_unary_rpc_method_handler(unary)

    def _with_data_slot(self, fn: Callable[[Any, Any], Any], *, streaming: bool) -> Any:
        """``fn`` run only with a free data-call slot; none free: NodeBusyError
        at once (waiting would hold the worker the slots exist to keep free)."""
        slots, total = self._data_slots, self._data_slot_count

        def busy() -> NodeBusyError:
            return NodeBusyError(f"all {total} data-call slots are in use; try again shortly")

        if streaming:

            def stream(request: Any, tenants: Any) -> Iterator[Any]:
                if not slots.acquire(blocking=False):
                    raise busy()
                try:
                    yield from fn(request, tenants)
                finally:
                    slots.release()

            return stream

        def unary(request: Any, tenants: Any) -> Any:
            if not slots.acquire(blocking=False):
                raise busy()
            try:
                return fn(request, tenants)
            finally:
                slots.release()

        return unary


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
