"""The reference-rendering cache: keyed on the volume's content, entries appear whole or not at all."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

import gridinr_nerfstudio.rendering.images as images_module
from gridinr_nerfstudio.data.dataparser import VolumeDataParserConfig


def references(data: Path, cache: Path) -> list[Path]:
    config = VolumeDataParserConfig(data=data, num_train_views=3, num_eval_views=1, image_size=16, cache_dir=cache)
    config.render.num_samples = 32
    return list(config.setup().get_dataparser_outputs("train").image_filenames)


def blob(seed: int) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, 9),) * 3, indexing="ij")
    centre = np.random.default_rng(seed).uniform(-0.4, 0.4, 3)
    return np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) * 8).astype(np.float32)


def test_key_follows_content_not_mtime_or_path(tmp_path: Path) -> None:
    volume = tmp_path / "vol.npy"
    np.save(volume, blob(0))
    first = references(volume, tmp_path / "cache")
    first_pixels = [iio.imread(path) for path in first]
    stat = volume.stat()
    np.save(volume, blob(1))  # same size, other voxels, mtime restored: must not reuse the old references
    os.utime(volume, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert volume.stat().st_size == stat.st_size and volume.stat().st_mtime_ns == stat.st_mtime_ns
    second = references(volume, tmp_path / "cache")
    assert second[0].parent != first[0].parent
    assert any(not np.array_equal(iio.imread(path), pixels) for path, pixels in zip(second, first_pixels))
    moved = tmp_path / "elsewhere" / "copy.npy"
    moved.parent.mkdir()
    shutil.copy(volume, moved)  # same bytes under another name: same entry
    assert references(moved, tmp_path / "cache") == second


def test_interrupted_render_leaves_no_entry(tmp_path: Path, monkeypatch) -> None:
    volume = tmp_path / "vol.npy"
    np.save(volume, blob(2))
    real_render = images_module.render_camera
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed half-way
        return real_render(*args, **kwargs)

    monkeypatch.setattr(images_module, "render_camera", failing)
    with pytest.raises(KeyboardInterrupt):
        references(volume, tmp_path / "cache")
    assert [path for path in (tmp_path / "cache").rglob("*") if path.is_file()] == []  # nothing half-written
    monkeypatch.setattr(images_module, "render_camera", real_render)
    paths = references(volume, tmp_path / "cache")
    assert len(paths) == 3 and all(path.is_file() for path in paths)


def test_concurrent_run_finishing_first_wins(tmp_path: Path, monkeypatch) -> None:
    """While one run renders, the entry is invisible; a second run that completes first is used as is."""
    volume = tmp_path / "vol.npy"
    np.save(volume, blob(3))
    real_render = images_module.render_camera
    state = {"other_done": None}

    def render_with_a_rival(*args, **kwargs):
        if state["other_done"] is None:
            assert list((tmp_path / "cache").glob("*/train")) == []  # our half-rendered entry is not visible
            state["other_done"] = []
            monkeypatch.setattr(images_module, "render_camera", real_render)
            state["other_done"] = references(volume, tmp_path / "cache")  # the rival completes the same entry
            monkeypatch.setattr(images_module, "render_camera", render_with_a_rival)
        folder = state["other_done"][0].parent
        visible = sorted(path.name for path in folder.iterdir())
        assert visible == ["complete.json", "view_000.png", "view_001.png", "view_002.png"]
        return real_render(*args, **kwargs)

    monkeypatch.setattr(images_module, "render_camera", render_with_a_rival)
    paths = references(volume, tmp_path / "cache")
    assert paths == state["other_done"] and all(path.is_file() for path in paths)
    leftovers = [path for path in paths[0].parent.parent.iterdir() if path.name != paths[0].parent.name]
    assert leftovers == []  # the loser's temporary folder is gone
