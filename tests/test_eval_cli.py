"""gridinr-eval: ns-eval's evaluation and JSON, for the run folder it is given (copies and moved runs included), and
one line, not a traceback, where a run folder has no checkpoint (also for nerfstudio's own ns-eval).

Reference: nerfstudio's ns-eval (`ComputePSNR`) on the same run in place, and the metrics.csv / checkpoint files.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from nerfstudio.scripts.eval import ComputePSNR

from gridinr_nerfstudio.runs import read_newest_checkpoint
from gridinr_nerfstudio.scripts.eval import main


def csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gridinr-eval: error: "), lines
    return lines[0]


def perturbed_checkpoint(run_dir: Path) -> Path:
    """A newer checkpoint in `run_dir` whose field's MLP is scaled down: another field, worse PSNR."""
    _, step, state = read_newest_checkpoint(run_dir / "nerfstudio_models")
    for key, value in state["pipeline"].items():
        if key.startswith("_model.field.") and value.is_floating_point() and value.dim() == 2:
            state["pipeline"][key] = value * 0.5
    state["step"] = step + 1
    path = run_dir / "nerfstudio_models" / f"step-{step + 1:09d}.ckpt"
    torch.save(state, path)
    return path


def test_a_copied_run_is_evaluated_from_its_own_folder(tiny_fit_run, tmp_path, capsys):
    ComputePSNR(load_config=tiny_fit_run, output_path=tmp_path / "ns-eval.json").main()
    reference = json.loads((tmp_path / "ns-eval.json").read_text())
    original_csv = tiny_fit_run.parent / "metrics.csv"
    original_rows = csv_rows(original_csv)

    copy = tmp_path / "moved" / "run"
    shutil.copytree(tiny_fit_run.parent, copy)
    out = tmp_path / "out.json"
    assert main(["--load-config", str(copy / "config.yml"), "--output-path", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ns-eval would have read that one" in printed
    ours = json.loads(out.read_text())
    assert ours.keys() == reference.keys() and ours["results"].keys() == reference["results"].keys()
    assert {ours[key] == reference[key] for key in ("experiment_name", "method_name")} == {True}
    assert Path(ours["checkpoint"]).parent == copy / "nerfstudio_models"
    for metric in ("psnr", "ssim", "volume_psnr"):  # the same evaluation as ns-eval's
        assert ours["results"][metric] == pytest.approx(reference["results"][metric], rel=1e-5)

    # The copy trains on: a newer checkpoint there is what gridinr-eval reads (ns-eval would read the original's).
    newer = perturbed_checkpoint(copy)
    assert "out.json exists (use --overwrite" in one_error_line(
        capsys, ["--load-config", str(copy / "config.yml"), "--output-path", str(out)])
    renders = tmp_path / "renders"
    assert main(["--load-config", str(copy / "config.yml"), "--output-path", str(out), "--overwrite",
                 "--render-output-path", str(renders)]) == 0
    later = json.loads(out.read_text())
    assert later["checkpoint"] == str(newer)
    assert later["results"]["volume_psnr"] < reference["results"]["volume_psnr"] - 1.0
    rows = csv_rows(copy / "metrics.csv")
    assert rows[-1]["step"] == str(int(newer.stem.split("-")[1]))
    assert float(rows[-1]["psnr"]) == pytest.approx(later["results"]["psnr"])
    assert csv_rows(original_csv) == original_rows  # the original run's CSV got nothing
    assert sorted(p.name for p in renders.iterdir()) and all(p.name.startswith("eval_") for p in renders.iterdir())
    assert [p for p in tmp_path.rglob(".*partial*")] == []


def test_a_copied_edit_run_reads_its_own_stage1_field(tmp_path, capsys):
    from tiny_runs import train_tiny_edit, train_tiny_fit

    stage1 = train_tiny_fit(tmp_path / "outputs", iterations=20)
    edit = train_tiny_edit(tmp_path / "outputs", stage1, iterations=2)
    copy = shutil.copytree(edit.parent, tmp_path / "copied-edit")
    shutil.move(stage1.parent, tmp_path / "stage1-moved-away")
    shutil.rmtree(edit.parent)  # neither the original edit run nor its stage-1 run is where the config says
    assert main(["--load-config", str(copy / "config.yml"), "--output-path", str(tmp_path / "edit.json")]) == 0
    result = json.loads((tmp_path / "edit.json").read_text())
    assert Path(result["checkpoint"]).parent == copy / "nerfstudio_models" and result["method_name"] == "gridinr-edit"
    assert csv_rows(copy / "metrics.csv")[-1]["stage"] == "edit" and "psnr" in result["results"]


def test_a_run_without_a_checkpoint_is_one_line_for_gridinr_eval_and_ns_eval(tiny_fit_run, tmp_path, capsys):
    from tiny_runs import relocated_run

    config = relocated_run(tiny_fit_run, tmp_path / "outputs", checkpoints=False)
    folder = config.parent / "nerfstudio_models"
    rows = csv_rows(config.parent / "metrics.csv")
    line = one_error_line(capsys, ["--load-config", str(config), "--output-path", str(tmp_path / "out.json")])
    assert line == f"gridinr-eval: error: {folder}: no step-*.ckpt checkpoint"
    assert not (tmp_path / "out.json").exists() and csv_rows(config.parent / "metrics.csv") == rows

    # nerfstudio's ns-eval: our pipeline config's setup stops it in one line before its loader's IndexError.
    with pytest.raises(SystemExit) as stopped:
        ComputePSNR(load_config=config, output_path=tmp_path / "ns.json").main()
    message = str(stopped.value.code)
    assert "\n" not in message and f"{folder}: no step-*.ckpt checkpoint" in message
    assert not (tmp_path / "ns.json").exists()

    # A stray file beside the checkpoints: nerfstudio's loader would parse it as a step; gridinr-eval skips it.
    with_checkpoint = relocated_run(tiny_fit_run, tmp_path / "with-checkpoint")
    (with_checkpoint.parent / "nerfstudio_models" / ".DS_Store").write_bytes(b"")
    with pytest.raises(SystemExit) as stopped:
        ComputePSNR(load_config=with_checkpoint, output_path=tmp_path / "ns.json").main()
    assert ".DS_Store beside the checkpoints" in str(stopped.value.code)
    assert main(["--load-config", str(with_checkpoint), "--output-path", str(tmp_path / "ok.json")]) == 0


def test_python_m_entry_point_and_bad_options(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "gridinr_nerfstudio.scripts.eval", "--load-config",
                             str(tmp_path / "none.yml")], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"gridinr-eval: error: {tmp_path / 'none.yml'}: no such config file (give a run's config.yml)"]
