"""Shared fixtures: the project's real data sets (skipped when absent) and small hand-written datasets."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

# One intra-op thread: with two threads on two cores, any other busy process makes every small op wait for a
# time slice (measured: 0.11 s vs 3.0 s per stage-2 step under load). Results are identical either way.
torch.set_num_threads(1)

# Without CUDA, our Triton kernels can only run in triton's interpreter, which triton reads from the environment
# when it is first imported (nerfstudio's imports pull it in): set it before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[str, Path]:
    """(model name, weights file) of a tiny random open_clip model registered for the tests (tests/tiny_models.py)."""
    from tiny_models import register_tiny_clip, save_tiny_clip_weights

    root = tmp_path_factory.mktemp("tiny-clip")
    name = register_tiny_clip(root / "configs")
    with torch.random.fork_rng():  # save_tiny_clip_weights seeds the global RNG
        return name, save_tiny_clip_weights(name, root / "open_clip_pytorch_model.bin")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test (weights must come from local files; `pytestmark =
    pytest.mark.usefixtures("no_network")` in modules that load models)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def shared_data() -> Callable[[str], Path]:
    """shared_data("c60") -> ../shared/data/c60, or skip the test when that data set is not there."""

    def locate(name: str) -> Path:
        path = SHARED_DATA / name
        if not (path / "dataset.json").is_file():
            pytest.skip(f"shared data set {name!r} not found at {path} (see ../shared/data/README.md)")
        return path

    return locate


@pytest.fixture
def write_raw_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Write a dataset folder by hand (json.dump + ndarray.tofile), independently of volume_io's writer.

    write_raw_dataset({"var": [step1_zyx, step2_zyx]}, name="tiny", spacing=None, with_dtype=True, suffix=".raw")
    returns the folder tmp_path / name.
    """

    def write(
        variables: dict[str, list[np.ndarray]],
        name: str = "tiny",
        spacing: list[float] | None = None,
        with_dtype: bool = True,
        suffix: str = ".raw",
    ) -> Path:
        root = tmp_path / name
        first = next(iter(variables.values()))[0]
        z, y, x = first.shape
        meta: dict = {"name": name, "dims": [x, y, z], "vars": list(variables),
                      "total_samples": len(next(iter(variables.values())))}
        if with_dtype:
            meta["dtype"] = first.dtype.name
        if spacing is not None:
            meta["spacing"] = spacing
        for var, steps in variables.items():
            (root / var).mkdir(parents=True, exist_ok=True)
            for step, array in enumerate(steps, start=1):
                array.astype(array.dtype.newbyteorder("<")).tofile(root / var / f"{name}-{var}-{step}{suffix}")
        (root / "dataset.json").write_text(json.dumps(meta))
        return root

    return write


@pytest.fixture
def small_volume(write_raw_dataset):
    """A 7 x 5 x 3 (X, Y, Z) int16 volume with distinct values, anisotropic spacing: axis mix-ups show."""
    rng = np.random.default_rng(0)
    voxels = rng.permutation(7 * 5 * 3).reshape(3, 5, 7).astype(np.int16) * 3 - 50  # (Z, Y, X)
    from gridinr_nerfstudio.data.volume_io import open_volume

    volume = open_volume(write_raw_dataset({"v": [voxels]}, spacing=[1.0, 2.0, 0.5]))
    return volume, voxels


def _coded_array(shape_zyx: tuple[int, int, int], step: int = 1, dtype: str = "float32") -> np.ndarray:
    """Values that name their voxel: x + 10 y + 100 z + 1000 (step - 1), so orientation mistakes show."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape_zyx), indexing="ij")
    return (x + 10 * y + 100 * z + 1000 * (step - 1)).astype(dtype)


@pytest.fixture
def tiny_dataset(write_raw_dataset: Callable[..., Path]) -> Path:
    """A 7x5x4 (X x Y x Z) float32 dataset "tiny", spacing (1, 2, 0.5), two time steps of two variables:
    "coded" holds x + 10 y + 100 z + 1000 (t - 1) at voxel (x, y, z), "noise" uniform random values in [-5, 5)."""
    shape = (4, 5, 7)
    rng = np.random.default_rng(0)
    return write_raw_dataset(
        {
            "coded": [_coded_array(shape, 1), _coded_array(shape, 2)],
            "noise": [rng.uniform(-5, 5, shape).astype(np.float32) for _ in range(2)],
        },
        spacing=[1.0, 2.0, 0.5],
    )


@pytest.fixture(scope="session")
def tiny_fit_run(tmp_path_factory) -> Path:
    """config.yml of a tiny gridinr-fit run on the built-in volume (trained once per test session)."""
    from tiny_runs import train_tiny_fit

    # 300 steps (about 1.5 s more than 60): renders show the volume (sphere and helix), not a faint blob.
    return train_tiny_fit(tmp_path_factory.mktemp("tiny-fit"), iterations=300)


@pytest.fixture
def keep_global_rng():
    """Tests that draw random numbers (views, crops, MLP inits) leave the global RNG as if they had not run
    (`pytestmark = pytest.mark.usefixtures("keep_global_rng")`)."""
    with torch.random.fork_rng():
        yield
