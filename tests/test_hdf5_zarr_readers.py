"""HDF5 (written by h5py), NetCDF-4 (written by the netCDF4 library) and Zarr v2/v3 stores (written by zarr) read
back equal to the numpy arrays they were written from: variables by path, time steps, geometry from coordinates
and attributes, CF packing, lazy chunk-by-chunk reads, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from gridinr_nerfstudio.data.dataparser import VolumeDataParserConfig
from gridinr_nerfstudio.data.readers.chunked import ChunkedArray
from gridinr_nerfstudio.data.volume_io import VolumeError, open_volume, read_info
from gridinr_nerfstudio.scripts import data as data_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(21)
SERIES = RNG.normal(size=(3, 6, 7, 9)).astype(np.float32)  # (T, Z, Y, X): 9 x 7 x 6 voxels, 3 steps


@pytest.fixture
def h5_file(tmp_path: Path) -> Path:
    path = tmp_path / "sim.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("still", data=SERIES[0])  # contiguous, uncompressed
        group = handle.create_group("fluid")
        series = group.create_dataset("pressure", data=SERIES, chunks=(1, 2, 3, 4), compression="gzip")
        series.attrs["element_size_um"] = [2.0, 0.5, 0.25]  # (z, y, x)
        big = group.create_dataset("density", data=SERIES[1].astype(">f8"), chunks=(3, 7, 9))
        big.attrs["spacing"], big.attrs["origin"] = [3.0, 2.0, 1.0], [30.0, 20.0, 10.0]
        handle.create_dataset("line", data=np.arange(5.0))
        handle.create_dataset("names", data=np.array([b"a", b"b"]))
    return path


def test_hdf5_variables_by_path_steps_geometry(h5_file: Path):
    info = read_info(h5_file)
    assert info.format == "hdf5" and info.variables == ["fluid/density", "fluid/pressure", "still"]
    assert "line (1-D)" in info.other_arrays and info.default_variable is None
    pressure = read_info(h5_file, "fluid/pressure")
    assert (pressure.dims, pressure.total_samples, pressure.spacing) == ((9, 7, 6), 3, (0.25, 0.5, 2.0))
    assert "chunks 4 x 3 x 2 x 1" in pressure.storage and "deflate" in pressure.storage
    for step in (1, 2, 3):
        volume = open_volume(h5_file, "/fluid/pressure", step)  # an HDF5 path with its leading slash works too
        assert isinstance(volume.data, ChunkedArray)
        np.testing.assert_array_equal(np.asarray(volume.data[:]), SERIES[step - 1])
        assert (volume.value_min, volume.value_max) == (float(SERIES[step - 1].min()), float(SERIES[step - 1].max()))
    still = open_volume(h5_file, "still")
    assert isinstance(still.data, np.memmap)  # contiguous: mapped at its offset in the file
    np.testing.assert_array_equal(still.data, SERIES[0])
    density = read_info(h5_file, "fluid/density")
    assert (density.spacing, density.origin, density.dtype) == ((1.0, 2.0, 3.0), (10.0, 20.0, 30.0), "float64")
    np.testing.assert_array_equal(np.asarray(open_volume(h5_file, "fluid/density").data[:]), SERIES[1])


def test_hdf5_sampling_matches_the_array_and_reads_only_touched_chunks(h5_file: Path):
    volume = open_volume(h5_file, "fluid/pressure", 2)
    reference = open_volume(h5_file, "still")  # the same kind of values, memory-mapped, as the reference path
    points = RNG.uniform(0, [8, 6, 5], (40, 3))
    expected = np.asarray(SERIES[1], dtype=np.float64)
    span = expected.max() - expected.min()
    corner = np.floor(points).astype(int)
    at_voxels = volume.sample_normalized(corner.astype(np.float64))
    np.testing.assert_allclose(at_voxels, (expected[corner[:, 2], corner[:, 1], corner[:, 0]] - expected.min()) / span,
                               atol=1e-6)
    assert reference.sample_normalized(points).shape == (40,)
    fresh = open_volume(h5_file, "fluid/pressure", 3)
    fresh.data = ChunkedArray(fresh.data.shape, fresh.data.dtype, fresh.data.chunks, fresh.data.read_box)
    fresh.sample_normalized(np.array([[0.5, 0.5, 0.5]]))
    assert fresh.data.chunks_read == 1 < np.prod(fresh.data.grid)  # one chunk holds all 8 neighbours


def test_hdf5_choice_errors_and_damage(h5_file: Path, tmp_path: Path):
    with pytest.raises(VolumeError) as error:
        open_volume(h5_file)
    assert str(error.value) == (f"{h5_file}: 3 volumes in the file (fluid/density, fluid/pressure, still): choose one "
                                "with --variable NAME (ns-train: --pipeline.datamanager.dataparser.variable NAME)")
    with pytest.raises(VolumeError, match=r"no variable 'fluid/temp' \(available: fluid/density, fluid/pressure, "):
        open_volume(h5_file, "fluid/temp")
    with pytest.raises(VolumeError, match="time step 4 out of range"):
        open_volume(h5_file, "fluid/pressure", 4)
    truncated = tmp_path / "cut.h5"
    truncated.write_bytes(h5_file.read_bytes()[:3000])
    garbage = tmp_path / "junk.hdf5"
    garbage.write_bytes(b"not hdf5 at all" * 10)
    classic = tmp_path / "old.nc"
    classic.write_bytes(b"CDF\x01" + bytes(60))
    for path, problem in ((truncated, "HDF5"), (garbage, "not an HDF5 file"), (classic, "netCDF-3 classic")):
        with pytest.raises(VolumeError) as error:
            read_info(path)
        assert "\n" not in str(error.value) and str(error.value).startswith(str(path)) and problem in str(error.value)


def test_netcdf4_coordinates_time_and_packing(tmp_path: Path):
    netCDF4 = pytest.importorskip("netCDF4")
    path = tmp_path / "ocean.nc"
    with netCDF4.Dataset(path, "w") as nc:
        nc.title = "test ocean"
        for name, size in (("time", None), ("depth", 6), ("lat", 7), ("lon", 9)):
            nc.createDimension(name, size)
        coordinates = {"lon": 10.0 + 0.5 * np.arange(9), "lat": -3.0 + 2.0 * np.arange(7), "depth": [0, 1, 2, 4, 8, 16]}
        for name, values in coordinates.items():
            nc.createVariable(name, "f8", (name,))[:] = values
        temp = nc.createVariable("temp", "i2", ("time", "depth", "lat", "lon"), fill_value=-999)
        temp.scale_factor, temp.add_offset, temp.units = 0.01, 5.0, "degC"
        temp.set_auto_maskandscale(False)
        packed = np.round(SERIES * 100).astype(np.int16)
        packed[1, 0, 0, 0] = -999
        temp[:] = packed
    info = read_info(path)
    assert (info.format, info.variables, info.total_samples, info.dims) == ("netcdf", ["temp"], 3, (9, 7, 6))
    assert info.spacing == (0.5, 2.0, 16 / 5) and info.origin == (10.0, -3.0, 0.0)
    assert "coordinate z is not uniform" in info.description and "units degC" in info.description
    first = open_volume(path, timestep=1)
    unpacked = packed[0] * 0.01 + 5.0
    assert (first.value_min, first.value_max) == pytest.approx((unpacked.min(), unpacked.max()))
    np.testing.assert_array_equal(np.asarray(first.data[:]), packed[0])
    with pytest.raises(VolumeError, match="1 NaN/Inf or fill values"):
        open_volume(path, timestep=2)
    replaced = open_volume(path, timestep=2, nan_policy="replace", replace_value=5.0)
    assert replaced.normalized_slab(0, 1)[0, 0, 0] == pytest.approx((5.0 - replaced.value_min) /
                                                                    (replaced.value_max - replaced.value_min))
    parser = VolumeDataParserConfig(data=path, timesteps="all", preload_max_bytes=0).setup()
    assert parser.timesteps == [1, 2, 3] and parser.includes_time
    parser = VolumeDataParserConfig(data=path, timesteps="1:3", nan_policy="replace").setup()
    assert len({(v.value_min, v.value_max) for v in parser.volumes}) == 1  # one shared range over the steps


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_group_and_array_stores(tmp_path: Path, zarr_format: int):
    zarr = pytest.importorskip("zarr")
    group = zarr.open_group(tmp_path / "run.zarr", mode="w", zarr_format=zarr_format)
    dims = {"dimension_names": ["t", "z", "y", "x"]} if zarr_format == 3 else \
        {"attributes": {"_ARRAY_DIMENSIONS": ["t", "z", "y", "x"]}}
    series = group.create_array("fields/velocity_x", shape=SERIES.shape, chunks=(1, 3, 4, 5), dtype="f4", **dims)
    series[:] = SERIES
    group.create_array("fields/x", shape=(9,), dtype="f8")[:] = 4.0 + 0.25 * np.arange(9)
    group.create_array("fields/mask", shape=(6, 7, 9), chunks=(6, 7, 9), dtype="u1")[:] = SERIES[0] > 0
    info = read_info(tmp_path / "run.zarr", "fields/velocity_x")
    assert (info.format, info.total_samples, info.dims) == ("zarr", 3, (9, 7, 6))
    assert info.variables == ["fields/mask", "fields/velocity_x"] and info.spacing == (0.25, 1.0, 1.0)
    assert info.origin == (4.0, 0.0, 0.0) and f"Zarr v{zarr_format}" in info.storage
    for step in (1, 3):
        volume = open_volume(tmp_path / "run.zarr", "fields/velocity_x", step)
        np.testing.assert_array_equal(np.asarray(volume.data[:]), SERIES[step - 1])
        assert volume.source_file == tmp_path / "run.zarr" / "fields" / "velocity_x"
    volume = open_volume(tmp_path / "run.zarr", "fields/velocity_x", 2)
    fresh = ChunkedArray(volume.data.shape, volume.data.dtype, volume.data.chunks, volume.data.read_box)
    voxel = np.array([[1, 1, 1], [8, 6, 5]])
    np.testing.assert_array_equal(fresh[voxel[:, 2], voxel[:, 1], voxel[:, 0]], SERIES[1][voxel[:, 2], voxel[:, 1],
                                                                                         voxel[:, 0]])
    assert fresh.chunks_read == 2 < np.prod(fresh.grid)
    store = zarr.create_array(tmp_path / "plain.zarr", shape=(6, 7, 9), chunks=(2, 7, 9), dtype="i2",
                              zarr_format=zarr_format, attributes={"spacing": [2.0, 1.0, 0.5]})
    store[:] = np.round(SERIES[0] * 100)
    plain = open_volume(tmp_path / "plain.zarr")
    assert plain.variable == "value" and plain.info.spacing == (0.5, 1.0, 2.0)
    np.testing.assert_array_equal(np.asarray(plain.data[:]), np.round(SERIES[0] * 100))
    first = plain.fingerprint()
    store[0, 0, 0] = 12345
    assert open_volume(tmp_path / "plain.zarr").fingerprint() != first  # the digest follows the chunk files


def test_info_describes_each_variable(h5_file: Path, capsys):
    assert data_cli.main(["info", str(h5_file)]) == 0
    out = capsys.readouterr().out
    assert "variables:   fluid/density, fluid/pressure, still" in out and "not volumes: line (1-D)" in out
    assert "variable fluid/pressure:" in out and "  time steps:  3" in out and "  spacing:     0.25 0.5 2" in out
    assert "  origin:      10 20 30" in out and "memory-mapped" in out and "chunks 4 x 3 x 2 x 1" in out
    assert out.count("fluid/pressure t=") == 3
    assert data_cli.main(["info", str(h5_file), "--variable", "nope"]) == 1
    assert capsys.readouterr().err.strip().endswith("(available: fluid/density, fluid/pressure, still)")


def test_large_chunked_hdf5_and_zarr_under_a_memory_limit(tmp_path: Path):
    """512 MiB float32 volumes (a few chunks written, the rest the fill value) under a 320 MiB data limit: value
    range, sampling and a conversion to .npy stream through the chunks; reading one whole fails."""
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_DATA limits anonymous memory only on Linux")
    zarr = pytest.importorskip("zarr")
    side = 512
    with h5py.File(tmp_path / "big.h5", "w") as handle:
        dataset = handle.create_dataset("v", shape=(side,) * 3, dtype="f4", chunks=(64, 64, 64), compression="gzip")
        dataset[5, 4, 3] = 7.5
    array = zarr.create_array(tmp_path / "big.zarr", shape=(side,) * 3, chunks=(64, 64, 64), dtype="f4",
                              fill_value=0.0)
    array[5, 4, 3] = 7.5
    script = textwrap.dedent(f"""
        import resource
        import numpy as np
        resource.setrlimit(resource.RLIMIT_DATA, (320 << 20, 320 << 20))
        from gridinr_nerfstudio.data.readers import chunked
        chunked.CHUNK_CACHE_BYTES = 32 << 20
        from gridinr_nerfstudio.data.volume_io import open_volume
        from gridinr_nerfstudio.export.convert import convert_volume
        for name in ("big.h5", "big.zarr"):
            volume = open_volume({str(tmp_path)!r} + "/" + name)
            print(volume.value_min, volume.value_max, *volume.sample_normalized(np.array([[3, 4, 5], [3.5, 4, 5]])))
            convert_volume(volume.info.path, {str(tmp_path)!r} + "/" + name + ".npy")
            try:
                np.array(volume.data) + 1
                print("loaded whole")
            except MemoryError:
                print("MemoryError")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:4] == ["0.0 7.5 1.0 0.5", "MemoryError"] * 2
    for name in ("big.h5", "big.zarr"):
        copy = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
        assert copy.shape == (side,) * 3 and copy[5, 4, 3] == 7.5 and float(copy[:8].sum()) == 7.5


def test_memory_bench_volumes_hold_the_same_voxels_in_every_container(tmp_path: Path):
    """gridinr-bench memory's HDF5 and Zarr volumes equal its raw one (read independently with numpy)."""
    from gridinr_nerfstudio.scripts.bench.memory import write_chunked_volume, write_sparse_volume

    side = 40
    raw = np.fromfile(write_sparse_volume(tmp_path, side), dtype=np.uint8).reshape(side, side, side)
    assert raw.max() > 100 and raw[0].max() == 0  # the ball in the middle, zeros around it
    for container in ("hdf5", "zarr"):
        volume = open_volume(write_chunked_volume(tmp_path, side, container))
        assert isinstance(volume.data, ChunkedArray)
        np.testing.assert_array_equal(np.asarray(volume.data), raw)
