"""`gridinr-data convert`: every output type read back by its own library equal to the input's values, with spacing
and origin; packed values unpacked; never over an existing file unasked, never over the input, nothing partial."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nrrd
import numpy as np
import pytest

from gridinr_nerfstudio.data.volume_io import open_volume, read_info
from gridinr_nerfstudio.scripts import data as data_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "vtk"


def expected_temperature() -> np.ndarray:
    z, y, x = np.meshgrid(np.arange(4), np.arange(5), np.arange(7), indexing="ij")
    return np.sin(0.3 * x) * np.cos(0.2 * y) + 0.01 * z * z


@pytest.mark.parametrize("source", ["appended_raw_zlib.vti", "legacy_binary.vtk"])
def test_round_trips_through_every_output(tmp_path: Path, source: str, capsys):
    """A VTK-written array converted to NRRD, .vti, .npy and raw + dataset.json: each read back independently."""
    expected = expected_temperature()
    outputs = {suffix: tmp_path / f"t{suffix}" for suffix in (".nrrd", ".vti", ".npy", ".raw")}
    for output in outputs.values():
        assert data_cli.main(["convert", str(FIXTURES / source), str(output), "--variable", "temperature"]) == 0
    assert "wrote" in capsys.readouterr().out
    values, header = nrrd.read(str(outputs[".nrrd"]), index_order="C")
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_allclose(header["space directions"], np.diag([0.5, 0.25, 2.0]))
    np.testing.assert_allclose(header["space origin"], [1.0, -2.0, 3.5])
    loaded = np.load(outputs[".npy"])
    assert loaded.dtype == np.float64 and loaded.shape == (4, 5, 7)
    np.testing.assert_array_equal(loaded, expected)
    folder = tmp_path / "t"
    meta = json.loads((folder / "dataset.json").read_text())
    assert (meta["dims"], meta["vars"], meta["dtype"]) == ([7, 5, 4], ["temperature"], "float64")
    assert (meta["spacing"], meta["origin"]) == ([0.5, 0.25, 2.0], [1.0, -2.0, 3.5])
    np.testing.assert_array_equal(np.fromfile(folder / "temperature" / "t-temperature-1.raw", "<f8").reshape(4, 5, 7),
                                  expected)
    vti = read_info(outputs[".vti"])
    assert (vti.spacing, vti.origin, vti.variables) == ((0.5, 0.25, 2.0), (1.0, -2.0, 3.5), ["temperature"])
    np.testing.assert_array_equal(np.asarray(open_volume(outputs[".vti"]).data), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t", "t.npy", "t.nrrd", "t.vti"]  # nothing partial


def test_time_step_of_hdf5_and_packed_netcdf(tmp_path: Path):
    series = np.random.default_rng(3).integers(0, 1000, (2, 4, 5, 6)).astype(np.uint16)
    with h5py.File(tmp_path / "s.h5", "w") as handle:
        handle.create_dataset("g/v", data=series, chunks=(1, 2, 5, 3), compression="gzip")
    assert data_cli.main(["convert", str(tmp_path / "s.h5"), str(tmp_path / "s2.npy"), "--variable", "g/v",
                          "--timestep", "2"]) == 0
    copy = np.load(tmp_path / "s2.npy")
    assert copy.dtype == np.uint16
    np.testing.assert_array_equal(copy, series[1])
    netCDF4 = pytest.importorskip("netCDF4")
    with netCDF4.Dataset(tmp_path / "p.nc", "w") as nc:
        for name, size in (("z", 4), ("y", 5), ("x", 6)):
            nc.createDimension(name, size)
        packed = nc.createVariable("p", "i2", ("z", "y", "x"), fill_value=-1)
        packed.scale_factor, packed.add_offset = 0.5, 100.0
        packed.set_auto_maskandscale(False)
        raw = series[0].astype(np.int16)
        raw[0, 0, 0] = -1
        packed[:] = raw
    assert data_cli.main(["convert", str(tmp_path / "p.nc"), str(tmp_path / "p.npy")]) == 0
    unpacked = np.load(tmp_path / "p.npy")
    assert unpacked.dtype == np.float32 and np.isnan(unpacked[0, 0, 0])
    np.testing.assert_allclose(unpacked.ravel()[1:], raw.ravel()[1:] * 0.5 + 100.0)


def test_never_over_a_file_unasked_nor_over_the_input(tmp_path: Path, capsys):
    source = tmp_path / "v.npy"
    array = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    np.save(source, array)
    existing = tmp_path / "out.nrrd"
    existing.write_bytes(b"keep me")
    assert data_cli.main(["convert", str(source), str(existing)]) == 1
    assert "exists (use --overwrite" in capsys.readouterr().err and existing.read_bytes() == b"keep me"
    assert data_cli.main(["convert", str(source), str(existing), "--overwrite"]) == 0
    np.testing.assert_array_equal(nrrd.read(str(existing), index_order="C")[0], array)
    assert data_cli.main(["convert", str(source), str(source), "--overwrite"]) == 1  # the input: never
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "is the input" in error
    np.testing.assert_array_equal(np.load(source), array)
    dataset = tmp_path / "ds.raw"
    assert data_cli.main(["convert", str(source), str(dataset)]) == 0
    inside = tmp_path / "ds" / "copy.npy"
    assert data_cli.main(["convert", str(tmp_path / "ds"), str(inside), "--overwrite"]) == 1
    assert "lies inside the input" in capsys.readouterr().err
    assert data_cli.main(["convert", str(source), str(tmp_path / "x.tiff")]) == 1
    assert "unknown output type '.tiff'" in capsys.readouterr().err
    linked = tmp_path / "linked.npy"  # another name for the input's bytes: still the input
    linked.hardlink_to(source)
    assert data_cli.main(["convert", str(source), str(linked), "--overwrite"]) == 1
    assert "the input volume" in capsys.readouterr().err and linked.read_bytes() == source.read_bytes()
    assert data_cli.main(["convert", str(source), str(tmp_path / "missing" / "x.npy")]) == 0  # folders made, as
    np.testing.assert_array_equal(np.load(tmp_path / "missing" / "x.npy"), array)  # every export does
    (tmp_path / "ds2" / "dataset.json").parent.mkdir()
    (tmp_path / "ds2" / "dataset.json").write_text("keep")
    assert data_cli.main(["convert", str(source), str(tmp_path / "ds2.raw")]) == 1  # a dataset folder's files too
    assert "exists (use --overwrite" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "ds2").rglob("*")] == ["dataset.json"]
    assert not [p for p in tmp_path.rglob(".*partial*")]
