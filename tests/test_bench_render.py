"""gridinr-bench render: the four contenders on a real (tiny) stage-1 run, their JSON, and their images' fidelity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gridinr_nerfstudio.scripts.bench.cli import main as bench_main
from gridinr_nerfstudio.scripts.bench.render import CONTENDERS


def test_render_benchmark_reports_every_contender(tiny_fit_run: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "render.json"
    bench_main(["render", "--load-config", str(tiny_fit_run), "--views", "1", "--occupancy-resolution", "16",
                "--json", str(output)])
    results = json.loads(output.read_text())
    for name in CONTENDERS:
        row = results[name]
        assert set(row) >= {"ms_per_frame", "rays_per_s", "psnr_db", "ssim"}
        assert row["ms_per_frame"] > 0 and row["rays_per_s"] > 0
        assert abs(row["rays_per_s"] * row["ms_per_frame"] / 1000.0 - 32 * 32) < 1e-3 * 32 * 32  # one 32x32 view
    # The raw voxels are what the references were rendered from: only the PNGs' 8-bit rounding separates them.
    assert results["raw_volume"]["psnr_db"] > 45.0 and results["raw_volume"]["ssim"] > 0.99
    # Skipping empty macrocells and stopping opaque rays must not change what the field shows.
    assert abs(results["field_accelerated"]["psnr_db"] - results["field"]["psnr_db"]) < 0.5
    assert results["field_cache"]["decode_seconds"] > 0
    assert results["config"]["occupancy_resolution"] == 16 and results["config"]["views"] == 1
    printed = capsys.readouterr().out
    assert all(name in printed for name in CONTENDERS) and "x raw time" in printed


def test_render_benchmark_device_and_backend_rows(tiny_fit_run: Path, tmp_path: Path) -> None:
    """--device cpu and --backends torch: an extra accelerated row on the torch backend showing the same image."""
    output = tmp_path / "render.json"
    bench_main(["render", "--load-config", str(tiny_fit_run), "--views", "1", "--occupancy-resolution", "16",
                "--device", "cpu", "--backends", "torch", "--json", str(output)])
    results = json.loads(output.read_text())
    assert results["config"]["device"].startswith("cpu")
    assert abs(results["field_accelerated_torch"]["psnr_db"] - results["field_accelerated"]["psnr_db"]) < 0.05


def test_fused_rows_show_the_torch_rows_images(tiny_fit_run: Path, tmp_path: Path) -> None:
    """The fused ray marcher's rows and the torch path's rows of the same renders score alike."""
    output = tmp_path / "render.json"
    bench_main(["render", "--load-config", str(tiny_fit_run), "--views", "1", "--occupancy-resolution", "16",
                "--json", str(output)])
    results = json.loads(output.read_text())
    for fused, torch_path in (("raw_volume", "raw_volume_torch"), ("field_cache", "field_cache_torch"),
                              ("raw_accelerated", "raw_volume_torch")):
        assert abs(results[fused]["psnr_db"] - results[torch_path]["psnr_db"]) < 0.05, (fused, torch_path)


def test_render_benchmark_against_vtk(tiny_fit_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("vtkmodules")
    output = tmp_path / "render.json"
    bench_main(["render", "--load-config", str(tiny_fit_run), "--views", "1", "--occupancy-resolution", "16",
                "--against", "vtk", "--json", str(output)])
    results = json.loads(output.read_text())
    assert results["vtk"]["ms_per_frame"] > 0 and results["vtk"]["mapper_ms_per_frame"] > 0
    # The same scene: VTK's image is close to the references (it differs in step, termination and fixed point;
    # 23.6 dB on this 32x32 view, 36.7 dB at 256x256 on the brain MRI).
    assert results["vtk"]["psnr_db"] > 20.0, results["vtk"]["psnr_db"]
    assert results["raw_vtk_settings"]["psnr_db"] > 35.0


def test_render_benchmark_against_vtk_without_vtk(tiny_fit_run: Path, monkeypatch) -> None:
    from gridinr_nerfstudio.scripts.bench import vtk_raycast

    monkeypatch.setattr(vtk_raycast, "vtk_available", lambda: False)
    with pytest.raises(SystemExit, match="vtk package is not installed"):
        bench_main(["render", "--load-config", str(tiny_fit_run), "--against", "vtk"])


def test_render_benchmark_busy_rows_and_static_split(tiny_fit_run: Path, tmp_path: Path, capsys) -> None:
    """--busy 1: each chosen row also timed beside a CPU burner; the static-split rows show the same images."""
    output = tmp_path / "render.json"
    chosen = "raw_accelerated,raw_accelerated_static,field_cache,field_cache_static"
    bench_main(["render", "--load-config", str(tiny_fit_run), "--views", "1", "--occupancy-resolution", "16",
                "--busy", "1", "--contenders", chosen, "--json", str(output)])
    results = json.loads(output.read_text())
    assert set(results) == {*chosen.split(","), "config"}
    assert results["config"]["busy"] == 1 and results["config"]["static_packet_rays"] >= 32 * 32 // 2
    for name in chosen.split(","):
        assert results[name]["busy_ms_per_frame"] > 0
        assert results[name]["busy_x_idle"] == results[name]["busy_ms_per_frame"] / results[name]["ms_per_frame"]
    for name in ("raw_accelerated", "field_cache"):
        assert results[f"{name}_static"]["psnr_db"] == results[name]["psnr_db"]
    assert "busy x idle" in capsys.readouterr().out


def test_render_benchmark_unknown_contender_is_one_line(tiny_fit_run: Path) -> None:
    with pytest.raises(SystemExit, match="unknown contender"):
        bench_main(["render", "--load-config", str(tiny_fit_run), "--contenders", "raw_volume,nonsense"])
