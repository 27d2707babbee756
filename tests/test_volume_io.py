"""volume_io and default_volume against independent reads (np.fromfile, pynrrd, nibabel, scipy)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel
import nrrd
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from gridinr_nerfstudio.data.default_volume import (
    BUILTIN_DEFAULT,
    default_volume_array,
    make_default_volume,
    open_data,
    write_default_dataset,
)
from gridinr_nerfstudio.data.volume_io import (
    Volume,
    VolumeError,
    open_volume,
    read_info,
    value_range,
    write_dataset,
    z_slabs,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def flat_read(path: Path, dtype: str) -> np.ndarray:
    """Independent read: the file as a flat little-endian array (x fastest)."""
    return np.fromfile(path, dtype=np.dtype(dtype).newbyteorder("<"))


def voxel_of_flat(flat: np.ndarray, dims: tuple[int, int, int], x: int, y: int, z: int) -> float:
    return flat[x + dims[0] * (y + dims[1] * z)]


def assert_one_line_error(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --- real data ---------------------------------------------------------------------------------------------------


def test_c60_info_range_and_orientation(shared_data):
    root = shared_data("c60")
    info = read_info(root)
    assert (info.name, info.dims, info.dtype, info.spacing) == ("c60", (128, 128, 128), "uint8", (1.0, 1.0, 1.0))
    assert (info.variables, info.total_samples, info.format) == (["density"], 1, "dataset")
    flat = flat_read(root / "density" / "c60-density-1.raw", "uint8")

    volume = open_volume(root)
    assert isinstance(volume.data, np.memmap) and volume.data.shape == (128, 128, 128)
    assert (volume.variable, volume.timestep) == ("density", 1)
    assert (volume.value_min, volume.value_max) == (float(flat.min()), float(flat.max()))
    rng = np.random.default_rng(1)
    for x, y, z in rng.integers(0, 128, (50, 3)):
        assert volume.data[z, y, x] == voxel_of_flat(flat, info.dims, x, y, z)


def test_fmri4d_both_time_steps(shared_data):
    root = shared_data("fmri4d")
    info = read_info(root / "dataset.json")
    assert (info.dims, info.dtype, info.total_samples) == ((128, 96, 24), "int16", 2)
    np.testing.assert_allclose(info.spacing, (2.0, 2.0, 2.2), rtol=1e-5)
    for step in (1, 2):
        flat = flat_read(root / "bold" / f"fmri4d-bold-{step}.raw", "int16")
        volume = open_volume(root, "bold", step)
        assert volume.source_file == root / "bold" / f"fmri4d-bold-{step}.raw"
        assert (volume.value_min, volume.value_max) == (float(flat.min()), float(flat.max()))
        for x, y, z in [(0, 0, 0), (127, 0, 0), (0, 95, 0), (0, 0, 23), (64, 48, 12), (100, 20, 5), (127, 95, 23)]:
            assert volume.data[z, y, x] == voxel_of_flat(flat, info.dims, x, y, z)
    steps = [open_volume(root, "bold", step).data for step in (1, 2)]
    assert not np.array_equal(steps[0], steps[1])


def test_sampling_at_voxel_centres_and_between_matches_scipy(shared_data):
    root = shared_data("fmri4d")
    volume = open_volume(root, timestep=2)
    ref = flat_read(root / "bold" / "fmri4d-bold-2.raw", "int16").reshape(24, 96, 128).astype(np.float64)
    normalized = (ref - ref.min()) / (ref.max() - ref.min())
    rng = np.random.default_rng(2)
    dims = np.array(volume.info.dims)

    centres = rng.integers(0, dims, (500, 3))
    np.testing.assert_allclose(volume.sample_normalized(centres),
                               normalized[centres[:, 2], centres[:, 1], centres[:, 0]], atol=1e-6)

    between = rng.uniform(-2.0, dims + 1.0, (2000, 3))  # includes points outside: clamped to the edge voxels
    expected = map_coordinates(normalized, between[:, ::-1].T, order=1, mode="nearest")
    got = volume.sample_normalized(between)
    assert got.dtype == np.float32 and got.shape == (2000,)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(volume.normalized_array(), normalized, atol=1e-6)


def test_nifti_of_fmri_matches_dataset(shared_data):
    """nibabel ships the NIfTI the fmri4d raw files were cut from: both readers must agree voxel for voxel."""
    root = shared_data("fmri4d")
    nifti = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    if not nifti.is_file():
        pytest.skip(f"nibabel's test data {nifti} is not installed")
    info = read_info(nifti)
    assert (info.dims, info.total_samples, info.format) == ((128, 96, 24), 2, "nifti")
    for step in (1, 2):
        np.testing.assert_array_equal(open_volume(nifti, timestep=step).data, open_volume(root, timestep=step).data)


# --- geometry ----------------------------------------------------------------------------------------------------


def test_half_size_and_world_to_voxel_follow_design(tiny_dataset):
    volume = open_volume(tiny_dataset)
    extent = (np.array([7, 5, 4]) - 1) * np.array([1.0, 2.0, 0.5])  # (6, 8, 1.5): y is the longest axis
    np.testing.assert_allclose(volume.half_size, extent / 8.0)
    h = volume.half_size
    corners = np.array([-h, h, np.zeros(3), [h[0], -h[1], 0.0]])
    expected = np.array([[0, 0, 0], [6, 4, 3], [3, 2, 1.5], [6, 0, 1.5]])
    np.testing.assert_allclose(volume.world_to_voxel(corners), expected, atol=1e-12)


def test_orientation_of_coded_voxels(tiny_dataset):
    for step in (1, 2):
        volume = open_volume(tiny_dataset, "coded", step)
        for x in range(7):
            for y in range(5):
                for z in range(4):
                    assert volume.data[z, y, x] == x + 10 * y + 100 * z + 1000 * (step - 1)
        assert (volume.value_min, volume.value_max) == (1000.0 * (step - 1), 1000.0 * (step - 1) + 6 + 40 + 300)


def test_trilinear_is_exact_on_a_linear_field(tiny_dataset):
    """The coded field is linear in (x, y, z), so trilinear interpolation reproduces it exactly between voxels."""
    volume = open_volume(tiny_dataset, "coded")
    points = np.random.default_rng(3).uniform(0, [6, 4, 3], (300, 3))
    linear = points @ np.array([1.0, 10.0, 100.0])
    np.testing.assert_allclose(volume.sample_normalized(points), linear / 346.0, atol=1e-6)


# --- chunking, memmaps, bigger than memory ------------------------------------------------------------------------


class ReadRecorder(np.memmap):
    """A memmap view that records how many voxels each indexing operation returns."""

    reads: list[int]

    def __getitem__(self, index):
        result = super().__getitem__(index)
        self.reads.append(int(np.size(result)))
        return result


def recording(data: np.memmap) -> ReadRecorder:
    view = data.view(ReadRecorder)
    view.reads = []
    return view


def test_value_range_in_chunks_smaller_than_volume(tmp_path):
    array = np.random.default_rng(4).normal(size=(20, 9, 11)).astype(np.float32)
    path = tmp_path / "noise_11x9x20_float32.raw"
    array.tofile(path)
    volume = open_volume(path)
    assert isinstance(volume.data, np.memmap)
    data = recording(volume.data)
    low, high, nonfinite = value_range(data, max_chunk_voxels=3 * 99)
    assert (low, high, nonfinite) == (float(array.min()), float(array.max()), 0)
    assert max(data.reads) == 3 * 99 < array.size
    assert len(data.reads) == len(z_slabs(array.shape, 3 * 99)) == 7


def test_sampling_reads_only_neighbours(tmp_path):
    array = np.random.default_rng(5).normal(size=(30, 20, 10)).astype(np.float32)
    np.save(tmp_path / "noise.npy", array)
    volume = open_volume(tmp_path / "noise.npy")
    assert isinstance(volume.data, np.memmap)
    volume.data = recording(volume.data)
    points = np.random.default_rng(6).uniform(0, 9, (16, 3))
    volume.sample_normalized(points)
    assert volume.data.reads == [16 * 8]  # one gather of the 8 neighbours of each point, never the whole array


def test_bigger_than_memory_limit(tmp_path):
    """A 512 MiB volume under a 192 MiB data limit: value range and sampling work, loading it whole fails."""
    pytest.importorskip("resource")
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_DATA limits anonymous memory only on Linux")
    path = tmp_path / "huge_512x512x512_float32.raw"
    with open(path, "wb") as handle:  # sparse file: zeros except two voxels
        handle.truncate(512**3 * 4)
        for (x, y, z), value in [((3, 4, 5), 7.5), ((500, 400, 300), -2.5)]:
            handle.seek(4 * (x + 512 * (y + 512 * z)))
            handle.write(np.float32(value).tobytes())
    script = textwrap.dedent(f"""
        import resource, sys
        import numpy as np
        resource.setrlimit(resource.RLIMIT_DATA, (192 << 20, 192 << 20))
        from gridinr_nerfstudio.data.volume_io import open_volume
        volume = open_volume({str(path)!r})
        print(volume.value_min, volume.value_max)
        print(*volume.sample_normalized(np.array([[3, 4, 5], [500, 400, 300], [3.5, 4, 5], [0, 0, 0]])))
        try:
            np.array(volume.data)
            print("loaded whole")
        except MemoryError:
            print("MemoryError")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0] == "-2.5 7.5"
    np.testing.assert_allclose([float(v) for v in lines[1].split()], [1.0, 0.0, 0.625, 0.25], atol=1e-6)
    assert lines[2] == "MemoryError"


def test_pickle_reopens_instead_of_copying_voxels(tmp_path):
    array = np.random.default_rng(7).normal(size=(40, 40, 40)).astype(np.float32)
    np.save(tmp_path / "noise.npy", array)
    volume = open_volume(tmp_path / "noise.npy")
    blob = pickle.dumps(volume)
    assert len(blob) < array.nbytes / 100
    copy = pickle.loads(blob)
    assert isinstance(copy.data, np.memmap)
    assert (copy.value_min, copy.value_max, copy.fingerprint()) == (volume.value_min, volume.value_max,
                                                                     volume.fingerprint())
    points = np.random.default_rng(8).uniform(0, 39, (100, 3))
    np.testing.assert_array_equal(copy.sample_normalized(points), volume.sample_normalized(points))


def test_fingerprint_is_stable_and_tracks_selection_and_content(tiny_dataset):
    first = open_volume(tiny_dataset, "coded", 1)
    assert first.fingerprint() == open_volume(tiny_dataset, "coded", 1).fingerprint()
    assert first.fingerprint() != open_volume(tiny_dataset, "coded", 2).fingerprint()
    assert first.fingerprint() != open_volume(tiny_dataset, "noise", 1).fingerprint()
    before = first.fingerprint()
    stat = first.source_file.stat()
    os.utime(first.source_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert first.fingerprint() == before  # touched, same bytes
    data = bytearray(first.source_file.read_bytes())
    data[0] ^= 1
    first.source_file.write_bytes(bytes(data))
    os.utime(first.source_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # other bytes, mtime restored
    assert first.fingerprint() != before


# --- bad input ---------------------------------------------------------------------------------------------------


def test_volume_error_is_a_value_error():
    assert issubclass(VolumeError, ValueError)


def test_wrong_file_size(tiny_dataset):
    data_file = tiny_dataset / "coded" / "tiny-coded-1.raw"
    data_file.write_bytes(data_file.read_bytes()[:-4])
    with pytest.raises(VolumeError) as error:
        open_volume(tiny_dataset)
    assert_one_line_error(error, str(data_file), "556 bytes", "expected 560 bytes", "7x5x4", "float32")


def test_dtype_defaults_to_float32(write_raw_dataset):
    root = write_raw_dataset({"v": [np.arange(24, dtype=np.float32).reshape(2, 3, 4)]}, with_dtype=False)
    volume = open_volume(root)
    assert volume.info.dtype == "float32" and volume.info.spacing == (1.0, 1.0, 1.0)
    assert (volume.value_min, volume.value_max) == (0.0, 23.0)


def test_dat_suffix(write_raw_dataset):
    root = write_raw_dataset({"v": [np.arange(24, dtype=np.int16).reshape(2, 3, 4)]}, suffix=".dat")
    volume = open_volume(root)
    assert volume.source_file.suffix == ".dat" and volume.data[1, 2, 3] == 23


def rewrite_json(root: Path, **changes) -> Path:
    json_path = root / "dataset.json"
    meta = json.loads(json_path.read_text())
    meta.update(changes)
    json_path.write_text(json.dumps(meta))
    return json_path


def test_unknown_dtype(tiny_dataset):
    json_path = rewrite_json(tiny_dataset, dtype="float33")
    with pytest.raises(VolumeError) as error:
        read_info(tiny_dataset)
    assert_one_line_error(error, str(json_path), "unknown dtype 'float33'", "float32")


def test_missing_variable_lists_available(tiny_dataset):
    with pytest.raises(VolumeError) as error:
        open_volume(tiny_dataset, variable="pressure")
    assert_one_line_error(error, str(tiny_dataset), "'pressure'", "available: coded, noise")


@pytest.mark.parametrize("timestep", [0, 3, -1])
def test_time_step_out_of_range(tiny_dataset, timestep):
    with pytest.raises(VolumeError) as error:
        open_volume(tiny_dataset, timestep=timestep)
    assert_one_line_error(error, str(tiny_dataset), f"time step {timestep}", "valid: 1..2")


@pytest.mark.parametrize("dims", [[7, 5], [7, 0, 4], [7, -5, 4], [7, 5.5, 4], "7x5x4", [True, 5, 4], [7, 5, 4, 1]])
def test_dims_must_be_three_positive_integers(tiny_dataset, dims):
    json_path = rewrite_json(tiny_dataset, dims=dims)
    with pytest.raises(VolumeError) as error:
        read_info(json_path)
    assert_one_line_error(error, str(json_path), "dims must be three positive integers")


def test_missing_dataset_json(tmp_path):
    with pytest.raises(VolumeError) as error:
        read_info(tmp_path)
    assert_one_line_error(error, str(tmp_path), "missing dataset.json")


def test_malformed_dataset_json_names_position(tiny_dataset):
    json_path = tiny_dataset / "dataset.json"
    json_path.write_text('{\n  "name": "tiny",\n  "dims": [7, 5, 4,]\n}')
    with pytest.raises(VolumeError) as error:
        read_info(tiny_dataset)
    assert_one_line_error(error, str(json_path), "malformed JSON at line 3 column")


def test_missing_keys(tiny_dataset):
    json_path = tiny_dataset / "dataset.json"
    json_path.write_text(json.dumps({"name": "tiny", "dims": [7, 5, 4]}))
    with pytest.raises(VolumeError) as error:
        read_info(tiny_dataset)
    assert_one_line_error(error, str(json_path), "missing key(s) vars, total_samples")


def test_missing_data_file(tiny_dataset):
    missing = tiny_dataset / "noise" / "tiny-noise-2.raw"
    missing.unlink()
    with pytest.raises(VolumeError) as error:
        open_volume(tiny_dataset, "noise", 2)
    assert_one_line_error(error, str(missing), "missing data file")


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(VolumeError) as error:
        read_info(tmp_path / "nowhere")
    assert_one_line_error(error, str(tmp_path / "nowhere"), "no such file")
    (tmp_path / "volume.tiff").write_bytes(b"II*\0")
    with pytest.raises(VolumeError) as error:
        read_info(tmp_path / "volume.tiff")
    assert_one_line_error(error, "volume.tiff", "unknown volume format")
    (tmp_path / "volume.raw").write_bytes(b"\0" * 8)
    with pytest.raises(VolumeError) as error:
        read_info(tmp_path / "volume.raw")
    assert_one_line_error(error, "volume.raw", "NAME_XxYxZ_DTYPE.raw")


def test_nan_and_inf_error_by_default_and_replace_on_read(write_raw_dataset):
    array = np.linspace(1.0, 5.0, 60, dtype=np.float32).reshape(3, 4, 5)
    array[0, 0, 0], array[1, 2, 3], array[2, 3, 4] = np.nan, np.inf, -np.inf
    root = write_raw_dataset({"v": [array]})
    data_file = root / "v" / "tiny-v-1.raw"
    original_bytes = data_file.read_bytes()
    with pytest.raises(VolumeError) as error:
        open_volume(root)
    assert_one_line_error(error, str(data_file), "3 NaN/Inf values", "nan_policy='replace'")

    volume = open_volume(root, nan_policy="replace", replace_value=0.0)
    finite = array[np.isfinite(array)]
    assert (volume.value_min, volume.value_max) == (0.0, float(finite.max()))
    expected = np.where(np.isfinite(array), array, 0.0) / float(finite.max())
    np.testing.assert_allclose(volume.normalized_array(), expected, atol=1e-6)
    np.testing.assert_allclose(volume.sample_normalized(np.array([[0, 0, 0], [3, 2, 1], [0.5, 0, 0]])),
                               [0.0, 0.0, expected[0, 0, 1] / 2], atol=1e-6)
    assert data_file.read_bytes() == original_bytes

    inside = open_volume(root, nan_policy="replace", replace_value=2.0)
    assert (inside.value_min, inside.value_max) == (float(finite.min()), float(finite.max()))
    with pytest.raises(VolumeError):
        open_volume(root, nan_policy="ignore")


# --- other formats ----------------------------------------------------------------------------------------------


def coded_zyx(shape=(4, 5, 6), dtype="int16") -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (x + 10 * y + 100 * z).astype(dtype)


def assert_coded(volume: Volume, dims=(6, 5, 4)) -> None:
    assert volume.info.dims == dims
    for x, y, z in [(0, 0, 0), (5, 0, 0), (0, 4, 0), (0, 0, 3), (2, 3, 1), (5, 4, 3)]:
        assert volume.data[z, y, x] == x + 10 * y + 100 * z


def test_npy_round_trip(tmp_path):
    np.save(tmp_path / "coded.npy", coded_zyx())
    volume = open_volume(tmp_path / "coded.npy")
    assert isinstance(volume.data, np.memmap)
    assert (volume.info.format, volume.info.name, volume.info.dtype, volume.variable) == ("npy", "coded", "int16",
                                                                                          "value")
    assert_coded(volume)
    np.save(tmp_path / "flat.npy", np.zeros((4, 5)))
    with pytest.raises(VolumeError) as error:
        read_info(tmp_path / "flat.npy")
    assert_one_line_error(error, "flat.npy", "expected a 3-D array of shape (Z, Y, X)")
    np.save(tmp_path / "complex.npy", np.zeros((2, 2, 2), dtype=np.complex64))
    with pytest.raises(VolumeError) as error:
        read_info(tmp_path / "complex.npy")
    assert_one_line_error(error, "complex.npy", "unknown dtype 'complex64'")


def test_open_scivis_round_trip_and_size_check(tmp_path):
    path = tmp_path / "tiny_skull_6x5x4_uint16.raw"
    coded_zyx(dtype="uint16").tofile(path)
    volume = open_volume(path)
    assert isinstance(volume.data, np.memmap)
    assert (volume.info.name, volume.info.dtype, volume.info.format) == ("tiny_skull", "uint16", "scivis")
    assert_coded(volume)
    wrong = tmp_path / "skull_6x5x5_uint16.raw"
    coded_zyx(dtype="uint16").tofile(wrong)
    with pytest.raises(VolumeError) as error:
        open_volume(wrong)
    assert_one_line_error(error, str(wrong), "240 bytes", "expected 300 bytes", "6x5x5", "uint16")
    bad_dtype = tmp_path / "skull_6x5x4_float7.raw"
    bad_dtype.write_bytes(b"")
    with pytest.raises(VolumeError) as error:
        read_info(bad_dtype)
    assert_one_line_error(error, str(bad_dtype), "unknown dtype 'float7'")


@pytest.mark.parametrize("encoding, detached", [("raw", False), ("raw", True), ("gzip", False)])
def test_nrrd_round_trip(tmp_path, encoding, detached):
    path = tmp_path / ("coded.nhdr" if detached else "coded.nrrd")
    header = {"encoding": encoding, "spacings": [0.5, 1.0, 2.0], "content": "coded test volume"}
    nrrd.write(str(path), coded_zyx(), header, detached_header=detached, index_order="C")
    volume = open_volume(path)
    assert (volume.info.format, volume.info.dtype, volume.info.spacing) == ("nrrd", "int16", (0.5, 1.0, 2.0))
    assert volume.info.description == "coded test volume"
    assert isinstance(volume.data, np.memmap) == (encoding == "raw")
    assert_coded(volume)
    assert (volume.value_min, volume.value_max) == (0.0, 345.0)


def test_nrrd_truncated(tmp_path):
    path = tmp_path / "coded.nrrd"
    nrrd.write(str(path), coded_zyx(), {"encoding": "raw"}, index_order="C")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(VolumeError) as error:
        open_volume(path)
    assert_one_line_error(error, str(path), "expected 240 bytes", "6x5x4")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_with_time_and_scaling(tmp_path, suffix):
    steps = [coded_zyx(), coded_zyx() + 1000]
    xyzt = np.stack([s.T for s in steps], axis=-1)  # nibabel's (X, Y, Z, T)
    image = nibabel.Nifti1Image(xyzt, np.diag([0.5, 1.0, 2.0, 1.0]))
    image.header.set_slope_inter(2.0, -1.0)
    path = tmp_path / f"coded{suffix}"
    nibabel.save(image, path)
    info = read_info(path)
    assert (info.name, info.dims, info.total_samples, info.spacing) == ("coded", (6, 5, 4), 2, (0.5, 1.0, 2.0))
    for step in (1, 2):
        volume = open_volume(path, timestep=step)
        assert isinstance(volume.data, np.memmap) == (suffix == ".nii")
        if step == 1:
            assert_coded(volume)
        scaled = np.asarray(nibabel.load(path).dataobj[..., step - 1], dtype=np.float64).T  # nibabel applies scaling
        assert (volume.value_min, volume.value_max) == (scaled.min(), scaled.max())
        np.testing.assert_allclose(volume.normalized_array(), (scaled - scaled.min()) / np.ptp(scaled), atol=1e-6)


def test_write_dataset_round_trip(tmp_path):
    steps = [coded_zyx(dtype="uint16"), coded_zyx(dtype="uint16") * 2]
    root = write_dataset(tmp_path / "out", "coded", {"a": steps}, spacing=(1, 2, 3), description="test")
    meta = json.loads((root / "dataset.json").read_text())
    assert meta == {"name": "coded", "dims": [6, 5, 4], "vars": ["a"], "total_samples": 2, "dtype": "uint16",
                    "spacing": [1.0, 2.0, 3.0], "description": "test"}
    for step, array in enumerate(steps, start=1):
        np.testing.assert_array_equal(flat_read(root / "a" / f"coded-a-{step}.raw", "uint16"), array.ravel())


# --- default volume ----------------------------------------------------------------------------------------------


def test_default_volume_has_range_and_structure():
    volume = make_default_volume()
    data = volume.data
    assert data.shape == (96, 96, 96) and data.dtype == np.float32
    assert (volume.value_min, volume.value_max) == (0.0, 1.0)
    assert volume.source_file is None and volume.info.format == "procedural"
    assert 0.3 < np.mean(data == 0) < 0.95  # empty space around the structures
    assert np.mean((data > 0.05) & (data < 0.95)) > 0.05  # smooth Marschner-Lobb values in between
    assert np.abs(np.diff(data, axis=2)).max() >= 0.7  # sharp tube walls
    assert np.array_equal(data, default_volume_array())  # deterministic
    np.testing.assert_allclose(volume.sample_normalized(np.array([[10.0, 20.0, 30.0]])), data[30, 20, 10])
    for name in (None, BUILTIN_DEFAULT):
        assert open_data(name).fingerprint() == volume.fingerprint()
    with pytest.raises(VolumeError):
        open_data(BUILTIN_DEFAULT, variable="density")


def test_write_default_dataset_reads_back(tmp_path):
    root = write_default_dataset(tmp_path / "default", size=24)
    volume = open_volume(root)
    assert volume.info.dims == (24, 24, 24)
    np.testing.assert_array_equal(flat_read(volume.source_file, "float32"), default_volume_array(24).ravel())


def test_single_slice_volume(tmp_path):
    """One voxel along z: a flat box (h_z = 0), sampling stays within the slice."""
    array = np.random.default_rng(9).uniform(size=(1, 5, 7)).astype(np.float32)
    np.save(tmp_path / "slice.npy", array)
    volume = open_volume(tmp_path / "slice.npy")
    np.testing.assert_allclose(volume.half_size, [1.0, 4 / 6, 0.0])
    np.testing.assert_allclose(volume.world_to_voxel(np.array([[1.0, 0.0, 0.3]])), [[6.0, 2.0, 0.0]])
    normalized = (array[0] - array.min()) / np.ptp(array)
    points = np.array([[2.5, 1.0, 0.0], [6.0, 4.0, 0.7]])
    np.testing.assert_allclose(volume.sample_normalized(points),
                               [(normalized[1, 2] + normalized[1, 3]) / 2, normalized[4, 6]], atol=1e-6)


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("empty.nrrd", b"", "malformed NRRD header: empty file"),
        ("junk.nrrd", b"hello\nworld\n", "malformed NRRD header"),
        ("junk.nii", b"x" * 400, "unreadable NIfTI file"),
        ("junk.npy", b"x" * 400, "unreadable .npy file"),
        ("dataset.json", b"[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_files(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(VolumeError) as error:
        read_info(path)
    assert_one_line_error(error, str(path), problem)
