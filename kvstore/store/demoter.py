"""The background thread that keeps DRAM below its high watermark: it writes
DRAM's eviction victims to SSD (dropping clean copies at once), and compacts
the SSD tier when there is nothing to demote."""

from __future__ import annotations

import logging
import threading

from kvstore.errors import StorageError
from kvstore.keys import ScopedKey
from kvstore.store.block import Block
from kvstore.store.parts import StoreParts
from kvstore.tier import Tier

log = logging.getLogger(__name__)

DEMOTE_BATCH = 64  # blocks chosen per pass, so the lock is retaken often


class Demoter:
    def __init__(self, parts: StoreParts) -> None:
        assert parts.space.ssd is not None
        self._p = parts
        self.space = parts.space
        self._lock = parts.lock
        self._wake = parts.wake
        self._stopping = False
        self._running = 0  # passes under way
        self._thread = threading.Thread(target=self._run, name="kvstore-demoter", daemon=True)
        self._thread.start()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until DRAM is at or below its high watermark and no pass runs."""
        with self._wake:
            return self._wake.wait_for(
                lambda: self._stopping or (self._running == 0 and not self.space.above_high()),
                timeout,
            )

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join()

    def _run(self) -> None:
        space = self.space
        stalled = False  # last pass freed nothing (every victim pinned): back off
        while True:
            with self._wake:
                if stalled:
                    self._wake.wait(0.05)
                else:
                    self._wake.wait_for(lambda: self._stopping or space.above_high(), 1.0)
                if self._stopping:
                    return
                before = space.dram.used_bytes
                over = space.above_high()
                batch = self._pick() if over else []
                stalled = over and not batch and space.dram.used_bytes == before
                self._running += 1
            try:
                for key, b in batch:
                    self._demote(key, b)
                ssd = space.ssd
                limit = space.config.ssd.compact_garbage_ratio
                if not batch and ssd is not None and ssd.garbage_ratio() >= limit:
                    ssd.compact()
            except Exception:  # keep the thread alive; the failure is counted and logged
                log.exception("demotion pass failed")
            finally:
                with self._wake:
                    self._running -= 1
                    self._wake.notify_all()

    def _pick(self) -> list[tuple[ScopedKey, Block]]:
        """Victims down to the low watermark: clean copies are dropped now,
        dirty ones pinned and returned for writing to SSD. Lock held."""
        space = self.space
        blocks = space.index.blocks
        batch: list[tuple[ScopedKey, Block]] = []
        to_free = space.dram.used_bytes - space.low
        while to_free > 0 and len(batch) < DEMOTE_BATCH:
            key = space.policy(Tier.DRAM).victim(lambda k: blocks[k].pins > 0)
            if key is None:
                break
            b = blocks[key]
            assert b.home is Tier.DRAM
            to_free -= space.dram.chunk_size(b.nbytes)
            if b.on_ssd:
                space.drop_copy(key, b, Tier.DRAM)
            else:
                b.pins += 1
                batch.append((key, b))
        return batch

    def _demote(self, key: ScopedKey, b: Block) -> None:
        """Write one pinned DRAM block to SSD, then let its DRAM copy go."""
        space, ssd = self.space, self.space.ssd
        assert ssd is not None and b.home is Tier.DRAM
        try:
            self._p.write_ssd(key, space.view(b), b.digest, b.parent, b.compress)
            written = True
        except StorageError as e:
            log.warning("demotion of a %d-byte block failed: %s", b.nbytes, e)
            written = False
        with self._lock:
            if b.dead:
                if written and space.index.get(key) is None:
                    ssd.remove([key])
                space.unpin(b)
                return
            if written:
                b.on_ssd = True
                space.policy(Tier.SSD).insert(key, b.parent)
                space.counters.demotions += 1
            else:
                space.counters.demotion_failures += 1
            b.pins -= 1
            if b.pins == 0:  # no reader took it meanwhile: let the DRAM copy go
                space.drop_copy(key, b, Tier.DRAM)
