"""SZ3 and ZFP, the lossy compressors scientists use for volumes, at a given byte budget (for `gridinr-bench
compression`). Optional: `pip install 'gridinr-nerfstudio[bench]'` installs their Python bindings (pysz, zfpy).

Both compress the normalised volume (float32 in [0, 1]), so PSNRs are in the units of the INR's volume PSNR (data
range 1, decoded values clamped to [0, 1] as the INR's are), and sizes count every byte of the compressed stream
(headers included) against the budget:

- SZ3 (prediction + quantisation + entropy coding) in its PSNR error-bound mode: a bisection over the target PSNR
  finds the highest target whose stream fits the budget (the stream's size grows with the target);
- ZFP (block transform coding) in fixed-rate mode: the highest rate (bits per value, in ZFP's steps of 1/64 for 3-D
  blocks of 4^3 values) whose stream fits.

The PSNR reported is measured on the decompressed volume, not the target asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

INSTALL_HINT = "pip install 'gridinr-nerfstudio[bench]' (pysz, zfpy)"
ZFP_HEADER_BITS = 96
"""zfpy's full header (magic, field metadata, mode) precedes the blocks in the same word-aligned stream."""
ZFP_MIN_BLOCK_BITS = 9
"""ZFP's smallest fixed rate for float32: 1 + 8 bits per block."""


@dataclass
class Compressed:
    """One compressor at one budget: the stream's size, its PSNR and the setting that produced it."""

    bytes: int
    psnr_db: float
    setting: str
    parameter: float = math.nan
    """SZ3: the PSNR target (dB); ZFP: the rate (bits per value)."""


def missing(name: str) -> Optional[str]:
    """None when the compressor's binding imports, else why not (a line for the table's notes)."""
    module = {"SZ3": "pysz", "ZFP": "zfpy"}[name]
    try:
        __import__(module)
    except ImportError as error:
        return f"{name} skipped: {module} is not installed ({error}); {INSTALL_HINT}"
    return None


def psnr(decoded: np.ndarray, target: np.ndarray) -> float:
    """PSNR (dB, data range 1) of decoded values clamped to [0, 1]."""
    mse = float(np.mean(np.square(np.clip(decoded.astype(np.float64), 0.0, 1.0) - target.astype(np.float64))))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def sz3_compress(volume: np.ndarray, target_psnr_db: float) -> np.ndarray:
    """The SZ3 stream (uint8) of a float32 volume in PSNR error-bound mode."""
    from pysz import sz, szConfig, szErrorBoundMode

    config = szConfig()
    config.errorBoundMode = szErrorBoundMode.PSNR
    config.psnrErrorBound = float(target_psnr_db)
    stream, _ = sz.compress(np.ascontiguousarray(volume, dtype=np.float32), config)
    return stream


def sz3_decompress(stream: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    from pysz import sz

    decoded, _ = sz.decompress(stream, np.float32, shape)
    return decoded


def sz3_at_budget(volume: np.ndarray, budget_bytes: int, low_db: float = 1.0, high_db: float = 160.0,
                  tolerance_db: float = 0.05) -> Optional[Compressed]:
    """SZ3 at the highest PSNR target whose stream fits `budget_bytes`; None when even `low_db` does not fit."""
    best = None
    stream = sz3_compress(volume, low_db)
    if stream.nbytes > budget_bytes:
        return None
    best = (low_db, stream)
    stream = sz3_compress(volume, high_db)
    if stream.nbytes <= budget_bytes:
        best, low_db = (high_db, stream), high_db
    while high_db - low_db > tolerance_db:
        middle = 0.5 * (low_db + high_db)
        stream = sz3_compress(volume, middle)
        if stream.nbytes <= budget_bytes:
            low_db, best = middle, (middle, stream)
        else:
            high_db = middle
    target, stream = best
    decoded = sz3_decompress(stream, volume.shape)
    return Compressed(int(stream.nbytes), psnr(decoded, volume), f"PSNR target {target:.2f} dB", target)


def zfp_blocks(shape: tuple[int, ...]) -> int:
    """ZFP blocks of 4^d values covering an array (partial blocks at the edges count whole)."""
    return int(np.prod([math.ceil(n / 4) for n in shape]))


def zfp_stream_bytes(shape: tuple[int, ...], block_bits: int) -> int:
    """Bytes of zfpy's fixed-rate stream: header and blocks in one stream of 64-bit words."""
    return math.ceil((ZFP_HEADER_BITS + zfp_blocks(shape) * block_bits) / 64) * 8


def zfp_at_budget(volume: np.ndarray, budget_bytes: int) -> Optional[Compressed]:
    """ZFP fixed-rate at the highest rate whose stream fits `budget_bytes`; None when the lowest rate does not."""
    import zfpy

    volume = np.ascontiguousarray(volume, dtype=np.float32)
    values_per_block = 4 ** volume.ndim
    block_bits = (budget_bytes * 8 - ZFP_HEADER_BITS) // zfp_blocks(volume.shape)
    block_bits = min(block_bits, 32 * values_per_block)  # 32 bits a value: as many as float32 has
    while block_bits >= ZFP_MIN_BLOCK_BITS:
        stream = zfpy.compress_numpy(volume, rate=block_bits / values_per_block)
        if len(stream) <= budget_bytes:
            decoded = zfpy.decompress_numpy(stream)
            rate = block_bits / values_per_block
            return Compressed(len(stream), psnr(decoded, volume), f"rate {rate:.4g} bits/value", rate)
        block_bits -= 1
    return None
