"""VTK files written by VTK itself (tests/fixtures/vtk, made by make_vtk_fixtures.py with VTK 9.7.2) read back equal
to the formulas they were written from, with their spacing and origin; big ones are read lazily."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gridinr_nerfstudio.data.readers import vti as vti_reader
from gridinr_nerfstudio.data.readers.chunked import ChunkedArray
from gridinr_nerfstudio.data.volume_io import VolumeError, open_volume, read_info
from gridinr_nerfstudio.export.vti import write_vti

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "vtk"
REPO_ROOT = Path(__file__).resolve().parents[1]
XML_FILES = sorted(FIXTURES.glob("*.vti"))
LEGACY_FILES = sorted(FIXTURES.glob("*.vtk"))


def fixture_arrays() -> dict[str, np.ndarray]:
    """The point data of the fixtures, (Z, Y, X), recomputed here from make_vtk_fixtures.py's formulas."""
    z, y, x = np.meshgrid(np.arange(4), np.arange(5), np.arange(7), indexing="ij")
    return {
        "density": (x + 10 * y + 100 * z + 0.5).astype(np.float32),
        "temperature": np.sin(0.3 * x) * np.cos(0.2 * y) + 0.01 * z * z,
        "label": ((x * 7 + y * 3 + z * 5) % 251).astype(np.uint8),
    }


def test_every_variant_is_there():
    names = {p.name for p in XML_FILES + LEGACY_FILES}
    for variant in ("inline_ascii", "inline_base64", "inline_base64_zlib", "inline_base64_uint64", "appended_raw",
                    "appended_raw_uint64", "appended_raw_bigendian", "appended_base64", "appended_raw_zlib",
                    "appended_raw_zlib_uint64", "appended_raw_lz4", "appended_base64_lz4", "appended_raw_lzma"):
        assert f"{variant}.vti" in names
    assert {"legacy_ascii.vtk", "legacy_binary.vtk", "legacy_binary_v42.vtk", "legacy_ascii_v42.vtk"} <= names


@pytest.mark.parametrize("path", XML_FILES + LEGACY_FILES, ids=lambda p: p.name)
def test_vtk_written_file_reads_back(path: Path):
    info = read_info(path)
    assert info.dims == (7, 5, 4)  # X, Y, Z: not cubic, so a transposed read cannot pass
    assert info.spacing == (0.5, 0.25, 2.0) and info.origin == (1.0, -2.0, 3.5)
    assert info.variables == ["density", "temperature", "label"] and info.default_variable == "density"
    assert any(a.startswith("velocity") and "3 components" in a for a in info.other_arrays)
    assert any(a.startswith("cell_id") and "cell data" in a for a in info.other_arrays)
    ascii_text = "ascii" in path.name
    for name, expected in fixture_arrays().items():
        volume = open_volume(path, name)
        data = np.asarray(volume.data[0:4])
        assert data.shape == (4, 5, 7) and data.dtype.str[1:] == expected.dtype.str[1:]  # either byte order
        if name == "temperature" and ascii_text:  # VTK prints doubles in text with fewer digits than they hold
            np.testing.assert_allclose(data, expected, rtol=1e-9, atol=1e-12)
        else:
            np.testing.assert_array_equal(data, expected)
        assert (volume.value_min, volume.value_max) == pytest.approx((expected.min(), expected.max()), rel=1e-9)
        x, y, z = 6, 3, 2
        assert volume.data[np.array([z]), np.array([y]), np.array([x])][0] == pytest.approx(expected[z, y, x])
    assert read_info(path, "label").dtype == "uint8" and read_info(path, "temperature").dtype == "float64"


@pytest.mark.parametrize("name, kind", [("appended_raw.vti", np.memmap), ("appended_raw_bigendian.vti", np.memmap),
                                        ("legacy_binary.vtk", np.memmap), ("appended_raw_zlib.vti", ChunkedArray),
                                        ("appended_base64.vti", ChunkedArray), ("inline_base64.vti", ChunkedArray)])
def test_storage_kind(name: str, kind: type):
    """Uncompressed raw data is memory-mapped; compressed or base64 data is decoded on demand."""
    assert isinstance(open_volume(FIXTURES / name).data, kind)


def test_compressed_blocks_decoded_only_where_read(monkeypatch):
    """appended_raw_zlib.vti keeps each array in 256-byte zlib blocks: one z-slice of density (140 bytes) decodes
    the one or two blocks under it, not the whole array."""
    monkeypatch.setattr(vti_reader, "SLAB_BYTES", 1)  # one z-slice per chunk
    decoded = []
    original = vti_reader._decompress

    def counting(kind, data, size):
        decoded.append(size)
        return original(kind, data, size)

    monkeypatch.setattr(vti_reader, "_decompress", counting)
    info = read_info(FIXTURES / "appended_raw_zlib.vti")
    from gridinr_nerfstudio.data.readers.vti import open_vti

    data = open_vti(info, "density", 1).data
    np.testing.assert_array_equal(data[1:2], fixture_arrays()["density"][1:2])  # bytes 140..280: blocks 0 and 1
    assert len(decoded) == 2 and sum(decoded) == 512 < 4 * 5 * 7 * 4


def test_our_vti_writer_reads_back(tmp_path: Path):
    """export/vti.py's files (inline base64, header encoded on its own) read back with spacing and origin."""
    array = np.random.default_rng(0).normal(size=(6, 5, 9)).astype(np.float32)
    path = tmp_path / "ours.vti"
    write_vti(path, [array[:2], array[2:]], (9, 5, 6), (0.5, 1.0, 2.0), np.float32, name="field", origin=(1, 2, 3))
    info = read_info(path)
    assert (info.dims, info.spacing, info.origin, info.variables) == ((9, 5, 6), (0.5, 1.0, 2.0), (1.0, 2.0, 3.0),
                                                                      ["field"])
    np.testing.assert_array_equal(np.asarray(open_volume(path).data), array)


def test_large_appended_raw_vti_is_memory_mapped_under_a_memory_limit(tmp_path: Path):
    """A 512 MiB appended raw .vti (sparse file) under a 192 MiB data limit: range and sampling work, a whole read
    fails, so the reader maps the array instead of loading it."""
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_DATA limits anonymous memory only on Linux")
    side = 512
    path = tmp_path / "big.vti"
    head = (f'<?xml version="1.0"?>\n<VTKFile type="ImageData" version="1.0" byte_order="LittleEndian" '
            f'header_type="UInt64">\n<ImageData WholeExtent="0 {side - 1} 0 {side - 1} 0 {side - 1}" Origin="0 0 0" '
            f'Spacing="1 1 1">\n<Piece Extent="0 {side - 1} 0 {side - 1} 0 {side - 1}">\n<PointData Scalars="v">\n'
            '<DataArray type="Float32" Name="v" format="appended" offset="0"/>\n</PointData>\n</Piece>\n'
            '</ImageData>\n<AppendedData encoding="raw">\n_').encode()
    nbytes = side**3 * 4
    with open(path, "wb") as handle:
        handle.write(head + np.uint64(nbytes).tobytes())
        start = handle.tell()
        handle.truncate(start + nbytes + len(b"\n</AppendedData>\n</VTKFile>\n"))
        handle.seek(start + 4 * (3 + side * (4 + side * 5)))
        handle.write(np.float32(7.5).tobytes())
        handle.seek(start + nbytes)
        handle.write(b"\n</AppendedData>\n</VTKFile>\n")
    script = textwrap.dedent(f"""
        import resource
        import numpy as np
        resource.setrlimit(resource.RLIMIT_DATA, (192 << 20, 192 << 20))
        from gridinr_nerfstudio.data.volume_io import open_volume
        volume = open_volume({str(path)!r})
        print(type(volume.data).__name__, volume.value_min, volume.value_max)
        print(*volume.sample_normalized(np.array([[3, 4, 5], [3.5, 4, 5]])))
        try:
            np.array(volume.data) + 1
            print("loaded whole")
        except MemoryError:
            print("MemoryError")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["memmap 0.0 7.5", "1.0 0.5", "MemoryError"]


@pytest.mark.parametrize("content, problem", [
    (b"", "malformed VTK XML"),
    (b'<?xml version="1.0"?><VTKFile type="PolyData"><PolyData/></VTKFile>', "only ImageData"),
    (b'<VTKFile type="ImageData"><ImageData WholeExtent="0 1 0 1"><Piece/></ImageData></VTKFile>', "Extent"),
    (b'<VTKFile type="ImageData" compressor="vtkZstdDataCompressor"><ImageData/></VTKFile>', "unknown compressor"),
    (b"# vtk DataFile Version 3.0\nx\nASCII\nDATASET POLYDATA\n", "only STRUCTURED_POINTS"),
    (b"# vtk DataFile Version 3.0\nx\nASCII\nDATASET STRUCTURED_POINTS\nDIMENSIONS 2 2 2\nPOINT_DATA 8\n"
     b"SCALARS v float\nLOOKUP_TABLE default\n1 2 3\n", "ends early"),
])
def test_damaged_files_one_line(tmp_path: Path, content: bytes, problem: str):
    suffix = ".vtk" if content.startswith(b"# vtk") else ".vti"
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(VolumeError) as error:
        open_volume(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value) and problem in str(error.value)


def test_truncated_appended_data_and_missing_array(tmp_path: Path):
    data = (FIXTURES / "appended_raw.vti").read_bytes()
    path = tmp_path / "cut.vti"
    path.write_bytes(data[: data.index(b"_", data.index(b"<AppendedData")) + 300])  # inside density's 564 bytes
    with pytest.raises(VolumeError, match="unreadable data of array 'density': the file ends before"):
        open_volume(path, "density")
    with pytest.raises(VolumeError) as error:
        open_volume(FIXTURES / "appended_raw.vti", "pressure")
    assert "no variable 'pressure' (available: density, temperature, label)" in str(error.value)
