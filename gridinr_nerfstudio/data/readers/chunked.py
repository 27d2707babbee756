"""`ChunkedArray`: a read-only (Z, Y, X) array whose voxels stay in their container, decoded chunk by chunk.

Containers that cannot be memory-mapped (compressed HDF5/Zarr chunks, compressed or base64 VTK arrays) hand
`Volume` one of these instead of a memmap. It answers the two reads `Volume` makes: z-slabs (`data[z0:z1]`) and
point gathers (`data[iz, iy, ix]` with index arrays); each decodes only the chunks it touches, and decoded chunks
are kept in a least-recently-used cache of at most `CHUNK_CACHE_BYTES`, so process memory does not grow with the
volume (DESIGN.md, "Memory"). A gather groups its points by chunk, so a batch of random points decodes each
touched chunk once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

CHUNK_CACHE_BYTES = 128 << 20
"""Decoded chunks kept per array (least recently used dropped first)."""

ChunkReader = Callable[[tuple[slice, slice, slice]], np.ndarray]
"""Reads one box of the array (chunk-aligned slices along (Z, Y, X)) from the container."""


class ChunkedArray:
    """A lazily decoded array: shape (Z, Y, X), one dtype, read through `read_box` one chunk at a time."""

    ndim = 3

    def __init__(self, shape: Sequence[int], dtype: np.dtype, chunks: Sequence[int], read_box: ChunkReader,
                 cache_bytes: int | None = None) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.chunks = tuple(max(1, min(int(c), n)) for c, n in zip(chunks, self.shape))
        self.grid = tuple(-(-n // c) for n, c in zip(self.shape, self.chunks))  # chunks per axis
        self.read_box = read_box
        self.cache_bytes = int(CHUNK_CACHE_BYTES if cache_bytes is None else cache_bytes)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()  # the prefetching sampler reads from a second thread
        self.chunks_read = 0  # decoded from the container (cache misses), for tests and benchmarks

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[0 : self.shape[0]]
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple) and len(key) == 3 and all(isinstance(k, (np.ndarray, list)) for k in key):
            return self._gather(*(np.asarray(k, dtype=np.int64) for k in key))
        if isinstance(key, (int, np.integer)):
            index = int(key) + (self.shape[0] if key < 0 else 0)
            return self._box((slice(index, index + 1), slice(None), slice(None)))[0]
        if isinstance(key, slice):
            key = (key,)
        if isinstance(key, tuple) and all(isinstance(k, slice) and k.step in (None, 1) for k in key) and len(key) <= 3:
            return self._box(tuple(key) + (slice(None),) * (3 - len(key)))
        raise TypeError(f"ChunkedArray reads z-slabs, boxes of slices and point gathers, not {key!r}")

    # --- reads ---------------------------------------------------------------------------------------------------

    def _chunk(self, index: tuple[int, int, int]) -> np.ndarray:
        """Chunk `index` (in chunk units, (z, y, x)), decoded once while it stays in the cache."""
        key = (index[0] * self.grid[1] + index[1]) * self.grid[2] + index[2]
        with self._lock:
            chunk = self._cache.get(key)
            if chunk is not None:
                self._cache.move_to_end(key)
                return chunk
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, self.chunks, self.shape))
        chunk = np.ascontiguousarray(self.read_box(box), dtype=self.dtype)
        expected = tuple(s.stop - s.start for s in box)
        if chunk.shape != expected:
            raise ValueError(f"chunk {index} read as shape {chunk.shape}, expected {expected}")
        with self._lock:
            self.chunks_read += 1
            if chunk.nbytes <= self.cache_bytes:
                self._cache[key] = chunk
                self._cached += chunk.nbytes
                while self._cached > self.cache_bytes:
                    _, dropped = self._cache.popitem(last=False)
                    self._cached -= dropped.nbytes
        return chunk

    def _box(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        bounds = [k.indices(n)[:2] for k, n in zip(key, self.shape)]
        bounds = [(start, max(start, stop)) for start, stop in bounds]
        out = np.empty(tuple(stop - start for start, stop in bounds), dtype=self.dtype)
        if out.size == 0:
            return out
        ranges = [range(start // c, (stop - 1) // c + 1) for (start, stop), c in zip(bounds, self.chunks)]
        for cz in ranges[0]:
            for cy in ranges[1]:
                for cx in ranges[2]:
                    chunk = self._chunk((cz, cy, cx))
                    src, dst = [], []
                    for i, (start, stop), c in zip((cz, cy, cx), bounds, self.chunks):
                        low, high = max(start, i * c), min(stop, (i + 1) * c)
                        src.append(slice(low - i * c, high - i * c))
                        dst.append(slice(low - start, high - start))
                    out[tuple(dst)] = chunk[tuple(src)]
        return out

    def _gather(self, iz: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        iz, iy, ix = np.broadcast_arrays(iz, iy, ix)
        shape = iz.shape
        coords = [a.ravel() for a in (iz, iy, ix)]
        for axis, values in enumerate(coords):
            if values.size and (values.min() < 0 or values.max() >= self.shape[axis]):
                raise IndexError(f"index out of bounds for axis {axis} of size {self.shape[axis]}")
        out = np.empty(coords[0].size, dtype=self.dtype)
        if out.size == 0:
            return out.reshape(shape)
        chunk_of = [values // c for values, c in zip(coords, self.chunks)]
        key = (chunk_of[0] * self.grid[1] + chunk_of[1]) * self.grid[2] + chunk_of[2]
        order = np.argsort(key, kind="stable")
        starts = np.flatnonzero(np.diff(key[order], prepend=-1))
        ends = np.append(starts[1:], order.size)
        for start, end in zip(starts, ends):
            points = order[start:end]
            first = points[0]
            index = (int(chunk_of[0][first]), int(chunk_of[1][first]), int(chunk_of[2][first]))
            chunk = self._chunk(index)
            local = tuple(coords[axis][points] - index[axis] * self.chunks[axis] for axis in range(3))
            out[points] = chunk[local]
        return out.reshape(shape)
