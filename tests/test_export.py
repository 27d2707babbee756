"""gridinr-export: volumes, meshes, ParaView presets and field files out of tiny runs, read back independently.

References: the field decoded here with numpy-built coordinates (voxel index / (n - 1)), our volume reader and
pynrrd for NRRD/raw, xml.etree + base64 for VTI, plyfile/trimesh for meshes, scipy's trilinear interpolation of
the decoded grid at mesh vertices, our ParaView preset import, and safetensors' own loader.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from gridinr_nerfstudio.data.volume_io import open_volume, voxel_size_world
from gridinr_nerfstudio.export.source import VolumeMeta, from_run
from gridinr_nerfstudio.export.volume import convert
from gridinr_nerfstudio.scripts.export import main

VALUE_RANGE = (-120, 880)
SPACING = [1.0, 1.5, 2.0]


@pytest.fixture(scope="module")
def int_volume_run(tmp_path_factory, write_raw_dataset_module) -> Path:
    """config.yml of a tiny gridinr-fit run on a 24 x 20 x 16 int16 blob, range [-120, 880], spacing (1, 1.5, 2)."""
    from tiny_runs import train_tiny_fit

    return train_tiny_fit(tmp_path_factory.mktemp("export-fit"), data=write_raw_dataset_module, iterations=150)


@pytest.fixture(scope="module")
def write_raw_dataset_module(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("blob-data") / "blob"
    z, y, x = np.meshgrid(np.arange(16) * 2.0, np.arange(20) * 1.5, np.arange(24) * 1.0, indexing="ij")
    radius2 = (x - 11.5) ** 2 + (y - 14.25) ** 2 + (z - 15.0) ** 2
    values = VALUE_RANGE[0] + (VALUE_RANGE[1] - VALUE_RANGE[0]) * np.exp(-radius2 / 60.0)
    (root / "density").mkdir(parents=True)
    np.rint(values).astype("<i2").tofile(root / "density" / "blob-density-1.raw")
    meta = {"name": "blob", "dims": [24, 20, 16], "vars": ["density"], "total_samples": 1, "dtype": "int16",
            "spacing": SPACING}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def int_source(int_volume_run):
    return from_run(int_volume_run)


@pytest.fixture(scope="module")
def edit_run(tmp_path_factory, int_volume_run) -> Path:
    from tiny_runs import train_tiny_edit

    return train_tiny_edit(tmp_path_factory.mktemp("export-edit"), int_volume_run, iterations=2)


def decoded_directly(field, dims) -> np.ndarray:
    """Normalised field values (Z, Y, X) at voxel centres, coordinates built with numpy (index / (n - 1))."""
    x, y, z = dims
    zz, yy, xx = np.meshgrid(*(np.arange(n) / (n - 1) for n in (z, y, x)), indexing="ij")
    unit = torch.tensor(np.stack([xx, yy, zz], axis=-1).reshape(-1, 3), dtype=torch.float32)
    with torch.no_grad():
        values = field.forward_unit(unit).clamp(0, 1).numpy()
    return values.reshape(z, y, x)


def in_data_units(normalized: np.ndarray, meta: VolumeMeta) -> np.ndarray:
    """Normalised values in the blob's int16 units, with numpy."""
    low, high = meta.value_min, meta.value_max
    return np.clip(np.rint(normalized.astype(np.float64) * (high - low) + low), low, high).astype(np.int16)


def assert_same_ints(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to the rounding of values within float32 noise (1e-6 normalised) of a half-integer."""
    actual, expected = np.asarray(actual).astype(np.int64), expected.astype(np.int64)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1 and np.mean(actual == expected) > 0.995


def one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gridinr-export: error: "), captured.err
    return lines[0]


def test_nrrd_raw_and_npy_round_trip_through_our_reader(int_volume_run, int_source, tmp_path, capsys):
    expected = in_data_units(decoded_directly(int_source.field, (24, 20, 16)), int_source.meta)
    for name in ("v.nrrd", "v.raw", "v.npy"):
        # Slabs of 1000 voxels: three z-slices each, so the streaming writers join several slabs.
        assert main(["volume", "--load-config", str(int_volume_run), "--output", str(tmp_path / name),
                     "--slab-voxels", "1000", "--timestep", "1"]) == 0
    printed = capsys.readouterr().out
    assert "volume PSNR" in printed and "fp16" in printed
    for path in (tmp_path / "v.nrrd", tmp_path / "v"):  # .raw writes the dataset folder v/
        volume = open_volume(path)
        assert volume.info.dims == (24, 20, 16) and volume.info.dtype == "int16"
        assert volume.info.spacing == pytest.approx(SPACING)
        assert_same_ints(volume.data, expected)
    assert open_volume(tmp_path / "v").variable == "density"
    assert_same_ints(np.load(tmp_path / "v.npy"), expected)
    import nrrd

    data, header = nrrd.read(str(tmp_path / "v.nrrd"), index_order="C")
    assert_same_ints(data, expected)
    np.testing.assert_allclose(header["space directions"], np.diag(SPACING))
    np.testing.assert_allclose(header["space origin"], 0.0)


def test_resolution_and_normalized_units(int_volume_run, int_source, tmp_path):
    assert main(["volume", "--load-config", str(int_volume_run), "--output", str(tmp_path / "r.nrrd"),
                 "--resolution", "12", "--units", "normalized"]) == 0
    volume = open_volume(tmp_path / "r.nrrd")
    assert volume.info.dims == (12, 10, 8) and volume.info.dtype == "float32"
    extent = (np.array([24, 20, 16]) - 1) * SPACING  # the same physical box as the raw volume
    np.testing.assert_allclose((np.array(volume.info.dims) - 1) * np.array(volume.info.spacing), extent)
    np.testing.assert_allclose(np.asarray(volume.data), decoded_directly(int_source.field, (12, 10, 8)), atol=1e-6)


def test_vti_parses_back_to_the_same_values(int_volume_run, int_source, tmp_path):
    assert main(["volume", "--load-config", str(int_volume_run), "--output", str(tmp_path / "v.vti"),
                 "--slab-voxels", "1000"]) == 0
    root = ET.parse(tmp_path / "v.vti").getroot()
    assert root.get("type") == "ImageData" and root.get("header_type") == "UInt64"
    image = root.find("ImageData")
    assert image.get("WholeExtent").split() == ["0", "23", "0", "19", "0", "15"]
    np.testing.assert_allclose([float(s) for s in image.get("Spacing").split()], SPACING)
    np.testing.assert_allclose([float(s) for s in image.get("Origin").split()], 0.0)
    array = image.find("Piece/PointData/DataArray")
    assert array.get("type") == "Int16" and array.get("Name") == "density" and array.get("format") == "binary"
    text = array.text.strip()
    header_chars = 12  # base64 of one UInt64 byte count, encoded on its own (VTK's layout)
    count = int(np.frombuffer(base64.b64decode(text[:header_chars]), dtype="<u8")[0])
    data = np.frombuffer(base64.b64decode(text[header_chars:]), dtype="<i2")
    assert count == data.nbytes == 24 * 20 * 16 * 2
    expected = in_data_units(decoded_directly(int_source.field, (24, 20, 16)), int_source.meta)
    assert_same_ints(data.reshape(16, 20, 24), expected)


def test_data_units_conversion_rounds_and_clips_to_the_dtype():
    meta = VolumeMeta("m", "v", 1, (2, 2, 2), (1.0, 1.0, 1.0), "uint8", 10.0, 200.0)
    normalized = np.array([0.0, 0.5, 1.0, 0.2631578], dtype=np.float32)
    np.testing.assert_array_equal(convert(normalized, meta, "data"), np.array([10, 105, 200, 60], dtype=np.uint8))
    as_float = VolumeMeta("m", "v", 1, (2, 2, 2), (1.0, 1.0, 1.0), "float64", -2.0, 6.0)
    np.testing.assert_allclose(convert(normalized, as_float, "data"), normalized.astype(np.float64) * 8 - 2, rtol=1e-7)


def test_mesh_overlays_the_volume_and_sits_on_the_isovalue(int_volume_run, int_source, tmp_path):
    from plyfile import PlyData
    from scipy.ndimage import map_coordinates

    isovalue = 400.0
    assert main(["mesh", "--load-config", str(int_volume_run), "--isovalue", str(isovalue), "--normals",
                 "--output", str(tmp_path / "m.ply")]) == 0
    ply = PlyData.read(str(tmp_path / "m.ply"))
    vertices = np.stack([ply["vertex"][axis] for axis in "xyz"], axis=1).astype(np.float64)
    normals = np.stack([ply["vertex"][axis] for axis in ("nx", "ny", "nz")], axis=1).astype(np.float64)
    assert len(vertices) > 100
    extent = (np.array([24, 20, 16]) - 1) * np.array(SPACING)
    assert np.all(vertices >= -1e-4) and np.all(vertices <= extent + 1e-4)  # the volume's physical box
    low, high = int_source.meta.value_min, int_source.meta.value_max
    assert low == VALUE_RANGE[0] and 800 < high <= VALUE_RANGE[1]  # the blob's voxels (its peak is off-grid)
    level = (isovalue - low) / (high - low)
    # Exactly on the isovalue of the decoded grid (marching cubes interpolates along grid edges) ...
    grid = decoded_directly(int_source.field, (24, 20, 16))
    index_zyx = (vertices / np.array(SPACING))[:, ::-1].T
    np.testing.assert_allclose(map_coordinates(grid.astype(np.float64), index_zyx, order=1), level, atol=1e-4)
    # ... and close to it on the INR itself, between the voxel centres.
    with torch.no_grad():
        inr = int_source.field.forward_unit(torch.tensor(vertices / extent, dtype=torch.float32)).numpy()
    assert np.median(np.abs(inr - level)) < 0.02
    # Normals: unit length, from high to low values of the field, and agreeing with the faces' winding.
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    step = 0.2 * np.array(SPACING).min()
    with torch.no_grad():
        ahead = int_source.field.forward_unit(torch.tensor((vertices + step * normals) / extent, dtype=torch.float32))
        behind = int_source.field.forward_unit(torch.tensor((vertices - step * normals) / extent, dtype=torch.float32))
    assert (ahead < behind).float().mean() > 0.95
    faces = np.stack(ply["face"]["vertex_indices"])
    corners = vertices[faces]
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    assert np.mean((face_normals * normals[faces].mean(axis=1)).sum(axis=1) > 0) > 0.95


def test_mesh_of_an_edit_run_is_its_stage1_field(int_volume_run, edit_run, tmp_path):
    import trimesh

    for config, name in ((int_volume_run, "fit.obj"), (edit_run, "edit.obj")):
        assert main(["mesh", "--load-config", str(config), "--isovalue", "300", "--output", str(tmp_path / name)]) == 0
    fit, edit = (trimesh.load(tmp_path / name, process=False) for name in ("fit.obj", "edit.obj"))
    np.testing.assert_allclose(edit.vertices, fit.vertices, atol=1e-5)


def test_fit_preset_reimports_to_the_same_transfer_function(int_volume_run, int_source, tmp_path):
    from gridinr_nerfstudio.transfer.paraview import load_preset

    assert main(["transfer-function", "--load-config", str(int_volume_run), "--output", str(tmp_path / "tf.json")]) == 0
    (preset,) = json.loads((tmp_path / "tf.json").read_text())
    rgb_points, points = np.reshape(preset["RGBPoints"], (-1, 4)), np.reshape(preset["Points"], (-1, 4))
    assert preset["ColorSpace"] == "RGB"
    low, high = int_source.meta.value_min, int_source.meta.value_max
    assert rgb_points[0, 0] == pytest.approx(low) and rgb_points[-1, 0] == pytest.approx(high)
    assert points[:, 0].min() == pytest.approx(low) and points[:, 0].max() == pytest.approx(high)
    model = int_source.model
    reimported = load_preset(tmp_path / "tf.json", unit_distance=voxel_size_world(model.volume))
    np.testing.assert_allclose(reimported.table.numpy(), model.transfer_function().table.numpy(), atol=1e-6)


def test_edit_preset_reimports_to_the_learned_transfer_mlp(edit_run, tmp_path, capsys):
    from gridinr_nerfstudio.transfer.paraview import load_preset

    assert main(["transfer-function", "--load-config", str(edit_run), "--output", str(tmp_path / "tf.json")]) == 0
    assert "transfer MLP" in capsys.readouterr().out
    model = from_run(edit_run).model
    learned = model.color_fn()  # the MLP's lookup table, as the renderer reads it
    reimported = load_preset(tmp_path / "tf.json", unit_distance=voxel_size_world(model.volume))
    values = torch.linspace(0.0, 1.0, 10001)
    with torch.no_grad():
        (rgb, sigma), (rgb_back, sigma_back) = learned(values), reimported(values)
    # Between two table nodes both functions stay within the nodes' values: the tables' own resolution.
    table = learned.table.detach()
    step = (table[1:] - table[:-1]).abs().max(dim=0).values
    assert (rgb - rgb_back).abs().max() <= step[:3].max()
    assert (sigma - sigma_back).abs().max() <= step[3]
    # At the nodes themselves the preset holds the MLP's table exactly.
    (preset,) = json.loads((tmp_path / "tf.json").read_text())
    np.testing.assert_allclose(np.reshape(preset["RGBPoints"], (-1, 4))[:, 1:], table[:, :3].numpy(), atol=1e-6)


def test_model_file_decodes_the_same_volume_without_the_run(tiny_fit_run, tmp_path, capsys):
    from safetensors.torch import load_file

    assert main(["volume", "--load-config", str(tiny_fit_run), "--output", str(tmp_path / "run.npy")]) == 0
    assert main(["model", "--load-config", str(tiny_fit_run), "--output", str(tmp_path / "f32.safetensors")]) == 0
    assert main(["model", "--load-config", str(tiny_fit_run), "--output", str(tmp_path / "f16.safetensors"),
                 "--half", "--no-psnr"]) == 0
    printed = capsys.readouterr().out
    assert "compression ratio" in printed and "volume PSNR fp32" in printed
    run_dir = tiny_fit_run.parent
    moved = shutil.move(str(tmp_path / "f32.safetensors"), str(tmp_path / "elsewhere.safetensors"))
    assert main(["volume", "--model", moved, "--output", str(tmp_path / "model.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "model.npy"), np.load(tmp_path / "run.npy"))
    assert run_dir.is_dir()  # (the model file never needed it)
    # Half precision: half the bytes, and the values of the fp16-rounded weights.
    f32, f16 = (tmp_path / "elsewhere.safetensors").stat().st_size, (tmp_path / "f16.safetensors").stat().st_size
    assert f16 < 0.55 * f32
    state = load_file(str(tmp_path / "f16.safetensors"))
    assert state["encoding.params"].dtype == torch.float16 and state["aabb"].dtype == torch.float32
    assert main(["volume", "--model", str(tmp_path / "f16.safetensors"), "--output", str(tmp_path / "half.npy")]) == 0
    field = from_run(tiny_fit_run).field
    with torch.no_grad():
        for parameter in field.parameters():
            parameter.copy_(parameter.half().float())
    # (coordinates built two ways differ by float32 ulps: a few 1e-6 on the sharp built-in volume)
    np.testing.assert_allclose(np.load(tmp_path / "half.npy"), decoded_directly(field, (96, 96, 96)), atol=2e-5)


def test_bad_inputs_fail_with_one_line(int_volume_run, tmp_path, capsys):
    config = str(int_volume_run)
    assert "no such config file" in one_error_line(capsys, ["volume", "--load-config", str(tmp_path / "none.yml"),
                                                            "--output", str(tmp_path / "v.nrrd")])
    copied = shutil.copytree(int_volume_run.parent, tmp_path / "run", ignore=shutil.ignore_patterns("*.ckpt"))
    assert "checkpoint" in one_error_line(capsys, ["volume", "--load-config", str(copied / "config.yml"),
                                                   "--output", str(tmp_path / "v.nrrd")])
    line = one_error_line(capsys, ["mesh", "--load-config", config, "--isovalue", "5000", "--output", str(tmp_path / "m.ply")])
    assert "outside the data range [-120, " in line
    assert "unknown output type '.stl'" in one_error_line(
        capsys, ["mesh", "--load-config", config, "--isovalue", "100", "--output", str(tmp_path / "m.stl")])
    assert "unknown output type '.tiff'" in one_error_line(
        capsys, ["volume", "--load-config", config, "--output", str(tmp_path / "v.tiff")])
    assert "does not exist" in one_error_line(
        capsys, ["volume", "--load-config", config, "--output", str(tmp_path / "missing" / "v.nrrd")])
    (tmp_path / "a-file").write_text("")
    assert "cannot write" in one_error_line(
        capsys, ["model", "--load-config", config, "--output", str(tmp_path / "a-file" / "m.safetensors")])
    assert "fitted to time step(s) 1, got --timestep 2" in one_error_line(
        capsys, ["volume", "--load-config", config, "--timestep", "2", "--output", str(tmp_path / "v.nrrd")])
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    assert "not a safetensors file" in one_error_line(
        capsys, ["volume", "--model", str(tmp_path / "junk.safetensors"), "--output", str(tmp_path / "v.npy")])
    assert not (tmp_path / "v.nrrd").exists() and not (tmp_path / "v.npy").exists()


def test_python_m_entry_point(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "gridinr_nerfstudio.scripts.export", "volume", "--model",
                             str(tmp_path / "none.safetensors"), "--output", str(tmp_path / "v.npy")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"gridinr-export: error: {tmp_path / 'none.safetensors'}: no such model file"]


# --- nothing lost: run inputs, existing outputs, outputs too large (safe_write.py) -------------------------------


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*partial*"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_export_onto_the_runs_own_volume_is_refused_and_the_volume_survives(int_volume_run, write_raw_dataset_module,
                                                                          tmp_path, capsys):
    """As a user would: `--output DATA.raw` names the dataset folder the run was trained on. Before, the .raw writer
    truncated the memory-mapped source (Bus error, exit 135, a 0-byte volume). A copy of the run on a copy of the
    data, the user's command in a process of its own; then with --overwrite, which never reaches a run input."""
    import os
    import subprocess
    import sys

    from tiny_runs import relocated_run

    data = shutil.copytree(write_raw_dataset_module, tmp_path / "blob")
    config = relocated_run(int_volume_run, tmp_path / "outputs", data=data)
    before = snapshot(data)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = ["volume", "--load-config", str(config), "--output", str(tmp_path / "blob.raw")]
    result = subprocess.run([sys.executable, "-m", "gridinr_nerfstudio.scripts.export", *argv],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("gridinr-export")]
    assert errors == [f"gridinr-export: error: {data / 'dataset.json'} exists (use --overwrite to replace it)"]
    assert snapshot(data) == before
    assert main([*argv, "--overwrite"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"gridinr-export: error: {data / 'density' / 'blob-density-1.raw'}: is the run's volume file (what it was "
        "trained on); refusing to write over it (not even with --overwrite): choose another output"]
    assert snapshot(data) == before and leftovers(tmp_path) == []


def test_no_export_writes_over_a_run_input_by_any_name(int_volume_run, write_raw_dataset_module, tmp_path, capsys):
    config = str(int_volume_run)
    source_raw = write_raw_dataset_module / "density" / "blob-density-1.raw"
    before = snapshot(write_raw_dataset_module)
    os.link(source_raw, tmp_path / "hard-link.npy")
    (tmp_path / "soft-link.nrrd").symlink_to(source_raw)
    (tmp_path / "dataset-link.json").symlink_to(write_raw_dataset_module / "dataset.json")
    for argv in (["volume", "--output", str(tmp_path / "hard-link.npy")],
                 ["volume", "--output", str(tmp_path / "soft-link.nrrd")],
                 ["transfer-function", "--output", str(tmp_path / "dataset-link.json")],
                 ["transfer-function", "--output", str(write_raw_dataset_module / "dataset.json")]):
        line = one_error_line(capsys, [*argv, "--load-config", config, "--overwrite"])
        assert "refusing to write over it (not even with --overwrite)" in line
        assert "the run's volume file" in line or "dataset.json of the run's volume" in line
    assert snapshot(write_raw_dataset_module) == before and leftovers(tmp_path) == []
    assert leftovers(write_raw_dataset_module) == []


def test_every_export_refuses_an_existing_output_unless_overwrite(int_volume_run, int_source, tmp_path, capsys):
    outputs = {
        "volume": tmp_path / "v.nrrd", "mesh": tmp_path / "m.ply", "transfer-function": tmp_path / "tf.json",
        "model": tmp_path / "f.safetensors", "raw": tmp_path / "folder" / "dataset.json",
    }
    extra = {"mesh": ["--isovalue", "300"], "model": ["--no-psnr"]}
    for path in outputs.values():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"the user's own file")
    for command, path in outputs.items():
        output = tmp_path / "folder.raw" if command == "raw" else path
        argv = ["volume" if command == "raw" else command, "--load-config", str(int_volume_run), "--output",
                str(output), *extra.get(command, [])]
        assert one_error_line(capsys, argv) == f"gridinr-export: error: {path} exists (use --overwrite to replace it)"
        assert path.read_bytes() == b"the user's own file"
        assert main([*argv, "--overwrite"]) == 0
        assert path.read_bytes() != b"the user's own file"
    capsys.readouterr()
    np.testing.assert_array_equal(open_volume(tmp_path / "folder").data, open_volume(tmp_path / "v.nrrd").data)
    assert leftovers(tmp_path) == []


def test_the_psnr_is_measured_against_the_source_as_read(int_volume_run, int_source, write_raw_dataset_module,
                                                         tmp_path, capsys):
    (tmp_path / "v.npy").write_bytes(b"an older export")
    assert main(["volume", "--load-config", str(int_volume_run), "--output", str(tmp_path / "v.npy"),
                 "--overwrite", "--units", "normalized"]) == 0
    printed = capsys.readouterr().out
    decoded = np.load(tmp_path / "v.npy").astype(np.float64)
    raw = np.fromfile(write_raw_dataset_module / "density" / "blob-density-1.raw", dtype="<i2").reshape(16, 20, 24)
    target = (raw - raw.min()) / (raw.max() - raw.min())
    expected = 10 * np.log10(1.0 / np.mean((decoded - target) ** 2))
    assert f"volume PSNR {expected:.2f} dB" in printed


def test_a_failed_export_leaves_the_old_output_and_no_temporary_file(int_volume_run, tmp_path, capsys, monkeypatch):
    import gridinr_nerfstudio.export.volume as volume_export

    def disk_full(path, slabs, *args):
        Path(path).write_bytes(b"half an export")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(volume_export, "write_npy", disk_full)
    (tmp_path / "v.npy").write_bytes(b"yesterday's export")
    line = one_error_line(capsys, ["volume", "--load-config", str(int_volume_run), "--output", str(tmp_path / "v.npy"),
                                   "--overwrite"])
    assert line.endswith("cannot write (No space left on device)")
    assert (tmp_path / "v.npy").read_bytes() == b"yesterday's export" and leftovers(tmp_path) == []


def test_outputs_that_cannot_fit_are_one_line_and_leave_nothing(int_volume_run, int_source, tmp_path, capsys,
                                                                 monkeypatch):
    import shutil as shell

    import gridinr_nerfstudio.export.volume as volume_export

    config = str(int_volume_run)
    # 100000 voxels along the longest axis: petabytes on disk, and one z-slice alone is more memory than any machine.
    line = one_error_line(capsys, ["volume", "--load-config", config, "--output", str(tmp_path / "big.npy"),
                                   "--resolution", "100000"])
    free = shell.disk_usage(tmp_path).free
    x, y, z = volume_export.output_grid(int_source.meta, 100000).dims
    from gridinr_nerfstudio.safe_write import format_bytes

    assert f"needs {format_bytes(x * y * z * 2 + (1 << 16))} on disk" in line and "free in" in line
    assert str(free) not in line  # (formatted, not raw bytes)
    line = one_error_line(capsys, ["mesh", "--load-config", config, "--output", str(tmp_path / "big.ply"),
                                   "--isovalue", "300", "--resolution", "100000"])
    assert "marching cubes on a" in line and "of memory" in line and "available" in line
    # The memory limit of a volume export is one slab (at least one z-slice) at DECODE_BYTES_PER_VOXEL bytes.
    monkeypatch.setattr(volume_export, "available_memory", lambda: 24 * 20 * volume_export.DECODE_BYTES_PER_VOXEL - 1)
    line = one_error_line(capsys, ["volume", "--load-config", config, "--output", str(tmp_path / "v.npy"),
                                   "--slab-voxels", "1"])
    assert "decoding the 24 x 20 x 16 grid needs about 30.00 KiB of memory per slab" in line
    monkeypatch.setattr(volume_export, "available_memory", lambda: 24 * 20 * volume_export.DECODE_BYTES_PER_VOXEL)
    assert main(["volume", "--load-config", config, "--output", str(tmp_path / "v.npy"), "--slab-voxels", "1"]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["v.npy"]
