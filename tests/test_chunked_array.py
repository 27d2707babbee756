"""ChunkedArray against numpy indexing of the same array: slabs, boxes, point gathers, a bounded cache."""

from __future__ import annotations

import numpy as np
import pytest

from gridinr_nerfstudio.data.readers.chunked import ChunkedArray


def counted(array: np.ndarray, chunks, cache_bytes):
    boxes = []

    def read_box(box):
        boxes.append(box)
        return array[box]

    return ChunkedArray(array.shape, array.dtype, chunks, read_box, cache_bytes=cache_bytes), boxes


def test_reads_equal_numpy_and_touch_only_their_chunks():
    array = np.random.default_rng(0).normal(size=(13, 11, 9)).astype(np.float32)
    data, boxes = counted(array, (4, 5, 3), cache_bytes=1 << 20)
    assert data.grid == (4, 3, 3)
    np.testing.assert_array_equal(data[2:5], array[2:5])
    assert len(boxes) == 2 * 3 * 3  # z-chunks 0 and 1, every y/x chunk
    np.testing.assert_array_equal(data[3], array[3])
    np.testing.assert_array_equal(data[1:9, 2:7, 4:9], array[1:9, 2:7, 4:9])
    np.testing.assert_array_equal(np.asarray(data), array)
    assert len(boxes) == 36 and all(b[0].start % 4 == 0 and b[1].start % 5 == 0 for b in boxes)  # each once
    rng = np.random.default_rng(1)
    iz, iy, ix = (rng.integers(0, n, 300) for n in array.shape)
    np.testing.assert_array_equal(data[iz, iy, ix], array[iz, iy, ix])
    with pytest.raises(IndexError):
        data[np.array([13]), np.array([0]), np.array([0])]


def test_cache_stays_within_its_bound_and_gathers_decode_each_chunk_once():
    array = np.arange(16 * 16 * 16, dtype=np.float64).reshape(16, 16, 16)
    chunk_bytes = 4 * 4 * 4 * 8
    data, boxes = counted(array, (4, 4, 4), cache_bytes=3 * chunk_bytes)
    rng = np.random.default_rng(2)
    iz, iy, ix = (rng.integers(0, 16, 5000) for _ in range(3))
    np.testing.assert_array_equal(data[iz, iy, ix], array[iz, iy, ix])
    assert len(boxes) == data.chunks_read == 64  # 5000 points over 64 chunks: each decoded once, grouped
    assert data._cached <= 3 * chunk_bytes and len(data._cache) == 3
    np.testing.assert_array_equal(data[iz[:1], iy[:1], ix[:1]], array[iz[:1], iy[:1], ix[:1]])
