"""Generated sequences whose features move between steps (the cases of issue #23), for `gridinr-bench sequence`.

Each is a function of (z, y, x) in [-1, 1]^3 and a phase in [0, 1] (first step 0, last step 1) with values in [0, 1];
every one holds fine texture inside its moving feature, so a field must carry detail along, not just a blob.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gridinr_nerfstudio.data.volume_io import write_dataset


def _texture(x, y, z):
    """Fine structure in [0, 1] (sinusoids of several frequencies)."""
    return 0.5 + 0.25 * np.sin(11 * x + 3 * y) * np.cos(9 * y - 2 * z) + 0.25 * np.sin(13 * z + 5 * x)


def translation(z, y, x, phase):
    """A textured ball moving across the box along x (and a little along y); a static slab beside it."""
    cx, cy = -0.55 + 1.1 * phase, -0.2 + 0.3 * phase
    inside = np.clip(1.0 - np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + z**2) / 0.35, 0, 1)
    slab = np.where(np.abs(z + 0.7) < 0.12, 0.4 + 0.2 * np.sin(7 * x) * np.cos(5 * y), 0.0)
    return np.clip(inside * _texture(x - cx, y - cy, z) * 1.6 + slab, 0, 1)


def rotation(z, y, x, phase):
    """A textured bar (an ellipsoid) turning 90 degrees about the z axis."""
    angle = 0.5 * np.pi * phase
    u = np.cos(angle) * x + np.sin(angle) * y
    v = -np.sin(angle) * x + np.cos(angle) * y
    shape = np.clip(1.0 - np.sqrt((u / 0.75) ** 2 + (v / 0.25) ** 2 + (z / 0.3) ** 2), 0, 1)
    return np.clip(shape * _texture(u, v, z) * 1.8, 0, 1)


def growth(z, y, x, phase):
    """A textured blob whose radius grows from 0.15 to 0.7 (its texture scales with it)."""
    radius = 0.15 + 0.55 * phase
    distance = np.sqrt(x**2 + (y + 0.1) ** 2 + (z - 0.1) ** 2)
    shell = np.clip(1.0 - distance / radius, 0, 1)
    return np.clip(shell * _texture(x / radius * 0.5, y / radius * 0.5, z / radius * 0.5) * 1.6, 0, 1)


def front(z, y, x, phase):
    """A wavy travelling front: burnt (textured) behind it, fresh (dim) ahead, a bright sheet at the front."""
    position = -0.7 + 1.4 * phase + 0.12 * np.sin(3 * y + 1.0) * np.cos(2 * z)
    behind = 1.0 / (1.0 + np.exp((x - position) / 0.04))
    sheet = np.exp(-(((x - position) / 0.06) ** 2))
    return np.clip(0.15 + 0.45 * behind * _texture(x, y, z) + 0.5 * sheet, 0, 1)


def advected(z, y, x, phase, seed: int = 3):
    """A turbulent-looking field (random Fourier modes, k^-5/3 amplitudes) carried by a smooth swirling flow:
    values at x are the initial field at x traced back along the flow for `phase` time units (20 Euler steps)."""
    rng = np.random.default_rng(seed)
    modes = rng.integers(-6, 7, size=(48, 3))
    modes = modes[np.abs(modes).sum(axis=1) > 0]
    amplitudes = np.linalg.norm(modes, axis=1) ** (-5.0 / 6.0)
    shifts = rng.uniform(0, 2 * np.pi, size=len(modes))
    px, py, pz = x.copy(), y.copy(), z.copy()
    dt = phase * 0.9 / 20
    for _ in range(20):  # back along v = (-y, x, 0.3 sin(pi x)) * swirl of radius ~1
        vx, vy, vz = -py * np.cos(0.5 * pz), px * np.cos(0.5 * pz), 0.3 * np.sin(np.pi * px)
        px, py, pz = px - dt * vx, py - dt * vy, pz - dt * vz
    value = np.zeros_like(x)
    for (kx, ky, kz), amplitude, shift in zip(modes, amplitudes, shifts):
        value += amplitude * np.sin(kx * px * np.pi / 2 + ky * py * np.pi / 2 + kz * pz * np.pi / 2 + shift)
    value = (value - value.mean()) / (4 * value.std()) + 0.5
    return np.clip(value, 0, 1) * (np.sqrt(x**2 + y**2 + z**2) < 0.95)


def mixed(z, y, x, phase):
    """The earlier generated sequence: a ball moving along x, a blob growing, a static sinusoidal slab."""
    texture = np.where(np.abs(z + 0.6) < 0.15, 0.35 + 0.15 * np.sin(9 * x) * np.cos(7 * y), 0.0)
    ball = np.clip(1.0 - np.sqrt((x + 0.6 - 1.2 * phase) ** 2 + (y - 0.3) ** 2 + (z - 0.2) ** 2) / 0.3, 0, 1)
    radius = 0.1 + 0.3 * phase
    blob = np.exp(-((x + 0.3) ** 2 + (y + 0.4) ** 2 + (z - 0.3) ** 2) / (2 * radius**2))
    return np.clip(texture + ball + 0.8 * blob, 0, 1)


MOTIONS = {"translation": translation, "rotation": rotation, "growth": growth, "front": front,
           "advected": advected, "mixed": mixed}


def generate_sequence(folder: Path, motion: str = "mixed", size: int = 64, steps: int = 4) -> Path:
    """Write `steps` uint8 steps (Z, Y, X) of `motion` as our dataset format in `folder/motion`; returns it."""
    axis = np.linspace(-1.0, 1.0, size)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    frames = [(255 * MOTIONS[motion](z, y, x, step / max(steps - 1, 1))).round().astype(np.uint8)
              for step in range(steps)]
    return write_dataset(folder / motion, motion, {"value": frames}, description=f"generated moving sequence: {motion}")
