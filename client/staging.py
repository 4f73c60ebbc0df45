"""The host buffer paged puts and gets move through.

An engine's paged KV is gathered into one contiguous staging buffer, which
the store takes as it is (its block payloads back to back), and a get fills
it before the scatter. The buffer comes from the store's ``alloc`` (for a
remote node: memory its transfer engine moves with no bounce), is kept and
reused (fresh memory faults at under 1 GB/s on first touch), grows by
doubling, and is page-locked with ``cudaHostRegister`` where the caches are
on a GPU, so the CUDA kernels write it across PCIe directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

_REGISTER_PORTABLE_MAPPED = 0x01 | 0x02  # cudaHostRegisterPortable | cudaHostRegisterMapped


class Staging:
    """Not thread-safe: the client holds its lock around each use."""

    def __init__(self, alloc: Callable[[int], torch.Tensor]) -> None:
        self._alloc = alloc
        self._buf: torch.Tensor | None = None
        self._pin_tried = False
        self._registered = False  # we page-locked it, so we unlock it

    def take(self, nbytes: int, *, pin: bool) -> torch.Tensor:
        """A uint8 view of ``nbytes`` staging bytes (page-locked when ``pin``
        and CUDA is here)."""
        if self._buf is None or self._buf.numel() < nbytes:
            old = 0 if self._buf is None else self._buf.numel()
            self.release()
            # a normal tensor even when the engine calls from inference mode:
            # the buffer outlives the call, and inference tensors refuse
            # in-place writes outside that mode
            with torch.inference_mode(False):
                self._buf = self._alloc(max(nbytes, 2 * old))
        if pin and not self._pin_tried and torch.cuda.is_available():
            self._pin_tried = True
            self._registered = not self._buf.is_pinned() and _register(self._buf)
        return self._buf[:nbytes]

    def release(self) -> None:
        if self._buf is not None and self._registered:
            cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            cudart.cudaHostUnregister(self._buf.data_ptr())
        self._registered = self._pin_tried = False


def _register(buf: torch.Tensor) -> bool:
    """Page-lock ``buf`` in place; False (the staged copy path serves) where it fails."""
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    rc = cudart.cudaHostRegister(buf.data_ptr(), buf.numel(), _REGISTER_PORTABLE_MAPPED)
    if int(rc) != 0:
        log.warning(
            "cudaHostRegister of the %d-byte staging buffer failed (%s): paged "
            "copies go through a device-side staging step",
            buf.numel(),
            rc,
        )
        return False
    return True
