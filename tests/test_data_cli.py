"""`gridinr-data` exit codes and output, in-process (main) and as a real process (no traceback on bad input)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gridinr_nerfstudio.data.default_volume import default_volume_array
from gridinr_nerfstudio.scripts.data import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "gridinr_nerfstudio.scripts.data", *args], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=120)


def test_info_fmri4d_every_time_step(shared_data, capsys):
    root = shared_data("fmri4d")
    assert main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "dims:        128 x 96 x 24 (X x Y x Z)" in out
    assert "dtype:       int16" in out and "spacing:     2 2 2.2" in out
    assert "variables:   bold" in out and "time steps:  2" in out
    for step in (1, 2):
        flat = np.fromfile(root / "bold" / f"fmri4d-bold-{step}.raw", dtype="<i2")
        assert f"bold t={step}: [{flat.min()}, {flat.max()}]" in out


def test_info_c60_chosen_selection(shared_data, capsys):
    root = shared_data("c60")
    assert main(["info", str(root / "dataset.json"), "--variable", "density", "--timestep", "1"]) == 0
    out = capsys.readouterr().out
    flat = np.fromfile(root / "density" / "c60-density-1.raw", dtype=np.uint8)
    assert "dims:        128 x 128 x 128" in out and "dtype:       uint8" in out
    assert f"density t=1: [{flat.min()}, {flat.max()}]" in out


def test_info_only_the_chosen_time_step(tiny_dataset, capsys):
    assert main(["info", str(tiny_dataset), "--timestep", "2"]) == 0
    ranges = capsys.readouterr().out.split("value range:\n")[1].splitlines()
    assert ranges[0] == "  coded t=2: [1000, 1346]"
    assert [line.split(":")[0] for line in ranges] == ["  coded t=2", "  noise t=2"]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["info", "{root}/nowhere"], ["nowhere", "no such file"]),
        (["info", "{root}", "--variable", "pressure"], ["'pressure'", "available: coded, noise"]),
        (["info", "{root}", "--timestep", "5"], ["time step 5", "valid: 1..2"]),
    ],
)
def test_bad_input_prints_one_line_error_and_exits_non_zero(tiny_dataset, capsys, args, fragments):
    assert main([a.format(root=tiny_dataset) for a in args]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gridinr-data: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_broken_later_time_step_prints_nothing_but_the_error(tiny_dataset, capsys):
    """The report is built whole before printing, so a failing second step leaves no half report on stdout."""
    data_file = tiny_dataset / "noise" / "tiny-noise-2.raw"
    data_file.write_bytes(b"\0" * 3)
    assert main(["info", str(tiny_dataset)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and str(data_file) in captured.err and "3 bytes" in captured.err


def test_process_exit_codes_and_no_traceback(tmp_path):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "dataset.json").write_text("{not json")
    result = run_cli("info", str(bad))
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert str(bad / "dataset.json") in result.stderr and "malformed JSON at line 1 column 2" in result.stderr
    assert run_cli().returncode == 2  # argparse: a command is required


def test_default_writes_a_readable_dataset(tmp_path, capsys):
    out_dir = tmp_path / "default"
    assert main(["default", str(out_dir), "--size", "20"]) == 0
    assert str(out_dir) in capsys.readouterr().out
    flat = np.fromfile(out_dir / "value" / "default-value-1.raw", dtype="<f4")
    np.testing.assert_array_equal(flat, default_volume_array(20).ravel())
    assert main(["info", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "dims:        20 x 20 x 20" in out and "value t=1: [0, 1]" in out
    assert main(["default", str(out_dir), "--size", "1"]) == 1


def test_default_never_replaces_a_dataset_without_overwrite(tmp_path, capsys):
    out_dir = tmp_path / "default"
    assert main(["default", str(out_dir), "--size", "8"]) == 0
    raw = out_dir / "value" / "default-value-1.raw"
    before = {path: path.read_bytes() for path in (raw, out_dir / "dataset.json")}
    capsys.readouterr()
    assert main(["default", str(out_dir), "--size", "12"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gridinr-data: error: {raw} exists (use --overwrite to replace it)"]
    assert {path: path.read_bytes() for path in before} == before  # neither file touched
    # Someone else's dataset.json alone is enough to refuse (nothing of ours is written beside it).
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "dataset.json").write_text('{"name": "ct"}')
    assert main(["default", str(theirs)]) == 1
    assert "dataset.json exists" in capsys.readouterr().err and sorted(p.name for p in theirs.iterdir()) == ["dataset.json"]
    # With --overwrite both files are replaced, and the result reads back as the new size.
    assert main(["default", str(out_dir), "--size", "12", "--overwrite"]) == 0
    np.testing.assert_array_equal(np.fromfile(raw, dtype="<f4"), default_volume_array(12).ravel())
    assert sorted(p.name for p in out_dir.rglob("*")) == ["dataset.json", "default-value-1.raw", "value"]
