"""Size-class slab allocator over one preallocated pool (offsets, not objects).

The pool is cut into equal pages. A page is handed to one size class when that
class needs room and goes back to the free pages when its last chunk is freed,
so memory moves between classes as the workload changes. Objects larger than a
page take a run of contiguous pages.

Size classes are 2^k x {1, 1.25, 1.5, 1.75} (as in jemalloc): KV payloads are
powers of two times small factors (layers x heads x head_dim x block_size), so
the common sizes fit a class exactly and the worst internal waste is 20%.
Classes of 4 KiB and above are multiples of 4 KiB, so their chunks stay
page-aligned, which keeps memcpy at full speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MIN_CHUNK = 64
PAGE_ALIGN = 4096


_CLASSES: dict[int, int] = {}  # size -> class, for the few sizes a store sees (bounded)


def size_class(nbytes: int) -> int:
    """The chunk size that holds ``nbytes`` (remembered: a batch asks for one
    size hundreds of times)."""
    chunk = _CLASSES.get(nbytes)
    if chunk is None:
        chunk = _size_class(nbytes)
        if len(_CLASSES) < 4096:
            _CLASSES[nbytes] = chunk
    return chunk


def _size_class(nbytes: int) -> int:
    if nbytes <= MIN_CHUNK:
        return MIN_CHUNK
    k = (nbytes - 1).bit_length() - 1  # 2^k < nbytes <= 2^(k+1)
    quarter = (1 << k) // 4 or 1
    size = (1 << k) + quarter * -(-(nbytes - (1 << k)) // quarter)
    align = PAGE_ALIGN if size >= PAGE_ALIGN else MIN_CHUNK
    return -(-size // align) * align


@dataclass(slots=True)
class _Page:
    chunk: int  # chunk size of its class
    bump: int  # next never-used offset in the page
    end: int
    free: list[int] = field(default_factory=list)
    used: int = 0


class SlabAllocator:
    """Not thread-safe: the store calls it under its own lock."""

    def __init__(self, capacity: int, page_size: int) -> None:
        if page_size < PAGE_ALIGN or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= {PAGE_ALIGN}")
        self.page_size = page_size
        self.num_pages = capacity // page_size
        if self.num_pages == 0:
            raise ValueError(f"capacity {capacity} is smaller than one page ({page_size})")
        self.capacity = self.num_pages * page_size
        self._page_free = np.ones(self.num_pages, dtype=bool)
        self._pages: dict[int, _Page] = {}  # page index -> slab page
        self._partial: dict[int, dict[int, None]] = {}  # chunk size -> pages with room
        self._live: dict[int, int] = {}  # offset -> chunk size (or run bytes)
        self._runs: dict[int, int] = {}  # offset -> pages of a large run
        self.used_bytes = 0  # bytes in handed-out chunks and runs

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used_bytes

    @property
    def free_pages(self) -> int:
        return int(self._page_free.sum())

    def chunk_size(self, nbytes: int) -> int:
        """Bytes ``nbytes`` would occupy (its class, or its run of pages)."""
        if nbytes > self.page_size:
            return -(-nbytes // self.page_size) * self.page_size
        return size_class(nbytes)

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a chunk of at least ``nbytes``, or None when full."""
        if nbytes <= 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        if nbytes > self.page_size:
            return self._alloc_run(-(-nbytes // self.page_size))
        chunk = _CLASSES.get(nbytes) or size_class(nbytes)
        partial = self._partial.get(chunk)
        if partial is None:
            partial = self._partial[chunk] = {}
        if partial:
            index = next(iter(partial))
        else:
            index = self._take_pages(1)
            if index < 0:
                return None
            base = index * self.page_size
            self._pages[index] = _Page(chunk=chunk, bump=base, end=base + self.page_size)
            partial[index] = None
        page = self._pages[index]
        if page.free:
            offset = page.free.pop()
        else:
            offset = page.bump
            page.bump += chunk
        page.used += 1
        if not page.free and page.bump + chunk > page.end:
            del partial[index]
        self._live[offset] = chunk
        self.used_bytes += chunk
        return offset

    def free(self, offset: int) -> None:
        chunk = self._live.pop(offset, None)
        if chunk is None:
            raise ValueError(f"free of offset {offset} that is not allocated")
        self.used_bytes -= chunk
        run = self._runs.pop(offset, None)
        if run is not None:
            first = offset // self.page_size
            self._page_free[first : first + run] = True
            return
        index = offset // self.page_size
        page = self._pages[index]
        page.used -= 1
        if page.used == 0:
            del self._pages[index]
            self._partial[chunk].pop(index, None)
            self._page_free[index] = True
            return
        page.free.append(offset)
        self._partial[chunk][index] = None

    def _alloc_run(self, npages: int) -> int | None:
        first = self._take_pages(npages)
        if first < 0:
            return None
        offset = first * self.page_size
        self._runs[offset] = npages
        self._live[offset] = npages * self.page_size
        self.used_bytes += npages * self.page_size
        return offset

    def _take_pages(self, n: int) -> int:
        """Index of the first of ``n`` contiguous free pages, marked used; -1 if none."""
        free = self._page_free
        if n == 1:
            i = int(free.argmax())
            if not free[i]:
                return -1
        else:
            if n > self.num_pages:
                return -1
            counts = np.concatenate(([0], np.cumsum(free, dtype=np.int64)))
            starts = np.flatnonzero(counts[n:] - counts[:-n] == n)
            if starts.size == 0:
                return -1
            i = int(starts[0])
        free[i : i + n] = False
        return i
