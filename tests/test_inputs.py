"""Bad input through ns-train ends in one line and exit status 1, before the config dump and the run folder.

The inputs are the ones `gridinr-data info` rejects, plus a volume with one voxel along an axis and a constant
volume (info reports those with the same line), gridinr-edit's stage-1 config and CLIP weights, and degenerate
options. Trained through nerfstudio's own `ns-train` main (one real subprocess checks the terminal output).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nerfstudio.scripts.train import main as ns_train_main
from tiny_models import TINY_CLIP_CONFIG, register_tiny_clip, save_tiny_clip_weights
from tiny_runs import short_run, shrink_dataparser

from gridinr_nerfstudio.gridinr_config import edit_fast_trainer_config, edit_trainer_config, fit_trainer_config
from gridinr_nerfstudio.scripts import data as data_cli

REPO = Path(__file__).resolve().parents[1]


def run_fit(tmp_path: Path, data: Path, **overrides) -> tuple[str, Path]:
    """ns-train gridinr-fit on `data` with overrides ("batch_size", "image_size", "max_num_iterations");
    returns the exit message and the output folder (which must not exist afterwards)."""
    output = tmp_path / "outputs"
    config = short_run(fit_trainer_config(), output, "bad", overrides.pop("max_num_iterations", 5))
    config.pipeline.datamanager.dataparser.data = data
    shrink_dataparser(config.pipeline.datamanager.dataparser, tmp_path / "references")
    for key, value in overrides.items():
        target = config.pipeline.datamanager if key == "batch_size" else config.pipeline.datamanager.dataparser
        setattr(target, key, value)
    with pytest.raises(SystemExit) as exit_info:
        ns_train_main(config)
    return str(exit_info.value.code), output


def assert_one_line(message: str, *expected: str) -> None:
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("gridinr-") and ": error: " in message
    for part in expected:
        assert part in message, message


@pytest.fixture
def good_volume(tmp_path: Path) -> Path:
    path = tmp_path / "good.npy"
    np.save(path, np.random.default_rng(0).uniform(size=(6, 7, 8)).astype(np.float32))
    return path


def test_fit_rejects_what_info_rejects(tmp_path: Path, capsys) -> None:
    """Every volume `gridinr-data info` refuses is refused by ns-train with the same line, and nothing is written."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dataset.json").write_text('{"name": "x", "dims": [4, 4')  # truncated JSON
    (tmp_path / "short_4x4x4_uint8.raw").write_bytes(b"\0" * 10)  # wrong size
    np.save(tmp_path / "flat.npy", np.random.default_rng(1).uniform(size=(1, 6, 7)).astype(np.float32))
    np.save(tmp_path / "constant.npy", np.full((5, 6, 7), 3.0, np.float32))
    cases = {
        bad: "malformed JSON",
        tmp_path / "short_4x4x4_uint8.raw": "wrong file size",
        tmp_path / "missing.npy": "no such file",
        tmp_path / "flat.npy": "at least 2 voxels along each axis",
        tmp_path / "constant.npy": "is constant",
    }
    for path, problem in cases.items():
        assert data_cli.main(["info", str(path)]) == 1
        info_error = capsys.readouterr().err.strip().splitlines()
        assert len(info_error) == 1 and problem in info_error[0]
        message, output = run_fit(tmp_path, path)
        assert_one_line(message, str(path), problem)
        assert message.split(": error: ")[1] == info_error[0].split(": error: ")[1]  # the same words
        assert not output.exists() and not (tmp_path / "references").exists()


def test_fit_rejects_damaged_containers_as_info_does(tmp_path: Path, capsys) -> None:
    """VTK, HDF5 and Zarr inputs that cannot be read (damaged, no such variable, several and none chosen): the same
    one line from ns-train as from gridinr-data info/convert, and nothing written."""
    import h5py

    truncated = tmp_path / "cut.vti"
    fixture = (REPO / "tests" / "fixtures" / "vtk" / "appended_raw.vti").read_bytes()
    truncated.write_bytes(fixture[: fixture.index(b"<AppendedData") + 60])
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF\r\n" * 20)
    with h5py.File(tmp_path / "two.h5", "w") as handle:
        for name in ("a", "b"):
            handle.create_dataset(f"group/{name}", data=np.random.default_rng(0).uniform(size=(4, 5, 6)))
    (tmp_path / "empty.zarr").mkdir()
    cases = [  # (data, variable, problem, gridinr-data command)
        (truncated, None, "the file ends before the array", "info"),
        (tmp_path / "junk.h5", None, "not an HDF5 file", "info"),
        (tmp_path / "two.h5", "group/c", "no variable 'group/c' (available: group/a, group/b)", "info"),
        (tmp_path / "two.h5", None, "2 volumes in the file (group/a, group/b): choose one", "convert"),
        (tmp_path / "empty.zarr", None, "without Zarr metadata", "info"),
    ]
    for path, variable, problem, command in cases:
        args = [command, str(path)] + ([str(tmp_path / "out.npy")] if command == "convert" else [])
        assert data_cli.main(args + (["--variable", variable] if variable else [])) == 1
        info_error = capsys.readouterr().err.strip().splitlines()
        assert len(info_error) == 1 and problem in info_error[0], info_error
        message, output = run_fit(tmp_path, path, **({"variable": variable} if variable else {}))
        assert_one_line(message, str(path), problem)
        assert message.split(": error: ")[1] == info_error[0].split(": error: ")[1]
        assert not output.exists() and not (tmp_path / "references").exists() and not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize("option, value, words", [
    ("batch_size", -1, "--pipeline.datamanager.batch-size must be at least 0 (0: the device's default), got -1"),
    ("image_size", 0, "--pipeline.datamanager.dataparser.image-size must be at least 1"),
    ("num_train_views", 0, "num-train-views must be at least 1"),
    ("max_num_iterations", 0, "--max-num-iterations must be at least 1"),
])
def test_fit_rejects_degenerate_options(tmp_path: Path, good_volume: Path, option, value, words) -> None:
    message, output = run_fit(tmp_path, good_volume, **{option: value})
    assert_one_line(message, words)
    assert not output.exists()


def test_batch_size_0_is_the_devices_default(tmp_path: Path, good_volume: Path) -> None:
    """README: `batch-size 0` means the device's default, so it passes (the next check speaks)."""
    message, _ = run_fit(tmp_path, good_volume, batch_size=0, max_num_iterations=0)
    assert_one_line(message, "--max-num-iterations must be at least 1")


def run_fit_with(tmp_path: Path, data: Path, options: dict, iterations: int = 5) -> tuple[str, Path]:
    """ns-train gridinr-fit on `data` with options given by their paths ("pipeline.model.field.num_levels");
    returns the exit message and the output folder (which must not exist afterwards)."""
    output = tmp_path / "outputs"
    config = short_run(fit_trainer_config(), output, "bad", iterations)
    config.pipeline.datamanager.dataparser.data = data
    shrink_dataparser(config.pipeline.datamanager.dataparser, tmp_path / "references")
    set_options(config, options)
    with pytest.raises(SystemExit) as exit_info:
        ns_train_main(config)
    return str(exit_info.value.code), output


def set_options(config, options: dict) -> None:
    """config.a.b["c"] = value for {"a.b.c": value} (attributes of dataclasses, keys of dicts)."""
    for path, value in options.items():
        *parents, last = path.split(".")
        owner = config
        for part in parents:
            owner = owner[part] if isinstance(owner, dict) else getattr(owner, part)
        if isinstance(owner, dict):
            owner[last] = value
        else:
            setattr(owner, last, value)


@pytest.fixture
def three_steps(tmp_path: Path) -> Path:
    """A dataset of three time steps whose third step file is missing."""
    from gridinr_nerfstudio.data.volume_io import write_dataset

    rng = np.random.default_rng(0)
    folder = write_dataset(tmp_path / "seq", "seq", {"v": [rng.uniform(size=(4, 5, 6)).astype(np.float32)
                                                           for _ in range(3)]})
    (folder / "v" / "seq-v-3.raw").unlink()
    return folder


TIMESTEPS = "--pipeline.datamanager.dataparser.timesteps"


@pytest.mark.parametrize("options, words", [
    ({"pipeline.datamanager.dataparser.timesteps": "0"}, f"{TIMESTEPS} has step 0 out of range"),
    ({"pipeline.datamanager.dataparser.timesteps": "5:2"}, f"{TIMESTEPS} is an empty range (A:B needs A <= B), got '5:2'"),
    ({"pipeline.datamanager.dataparser.timesteps": "2:1"}, f"{TIMESTEPS} is an empty range"),
    ({"pipeline.datamanager.dataparser.timesteps": "abc"}, f"{TIMESTEPS} must be 'all', a step N or a range A:B"),
    ({"pipeline.datamanager.dataparser.timesteps": "1,2"}, f"{TIMESTEPS} must be 'all', a step N or a range A:B"),
    ({"pipeline.datamanager.dataparser.timesteps": "99"}, f"{TIMESTEPS} '99' of VOLUME: time step 99 out of range (valid: 1..2)"),
    ({"pipeline.model.field.num_levels": 0}, "--pipeline.model.field.num-levels must be at least 1, got 0"),
    ({"pipeline.model.field.log2_hashmap_size": 40}, "--pipeline.model.field.log2-hashmap-size must be in [1, 31]"),
    ({"pipeline.model.field.log2_hashmap_size": 30, "pipeline.model.field.max_resolution": 8192},
     "--pipeline.model.field.log2-hashmap-size 30 with 8 levels of 2 features: the hash tables need"),
    ({"pipeline.model.field.hidden_dim": -4}, "--pipeline.model.field.hidden-dim must be at least 1, got -4"),
    ({"pipeline.model.field.features_per_level": 3}, "--pipeline.model.field.features-per-level must be one of 1, 2, 4, 8"),
    ({"pipeline.model.field.max_resolution": 8}, "--pipeline.model.field.max-resolution must be at least --pipeline.model.field.base-resolution (16)"),
    ({"pipeline.model.field.backend": "cuda"}, "--pipeline.model.field.backend must be one of auto, tcnn, triton, cpp, torch"),
    ({"pipeline.datamanager.continuous_fraction": 2.0}, "--pipeline.datamanager.continuous-fraction must be in [0, 1], got 2.0"),
    ({"pipeline.datamanager.continuous_fraction": -0.5}, "--pipeline.datamanager.continuous-fraction must be in [0, 1], got -0.5"),
    ({"pipeline.datamanager.dataparser.render.colormap": "nope"}, "render.colormap is not a matplotlib colormap name"),
    ({"pipeline.datamanager.dataparser.render.opacity_scale": 0.0}, "render.opacity-scale must be in (0, inf) (0 renders nothing)"),
    ({"pipeline.datamanager.dataparser.nan_policy": "ignore"}, "nan-policy must be one of error, replace, got 'ignore'"),
    ({"pipeline.datamanager.train_num_rays_per_batch": 512}, "--pipeline.datamanager.train-num-rays-per-batch is not supported by gridinr-fit"),
    ({"pipeline.model.prompt": "a red volume"}, "--pipeline.model.prompt is not used by gridinr-fit"),
    ({"optimizers.encoding.optimizer.lr": 0.0}, "--optimizers.encoding.optimizer.lr must be in (0, inf), got 0.0"),
    ({"gradient_accumulation_steps": {"fields": 2}}, "--gradient-accumulation-steps names 'fields', which is not an optimizer group"),
    ({"steps_per_save": -1}, "--steps-per-save must be at least 0 (0: never during training"),
    ({"machine.seed": -1}, "--machine.seed must be in [0, 4.29497e+09]"),
    ({"pipeline.model.field_cache_resolution": 1}, "--pipeline.model.field-cache-resolution must be -1 (the INR itself)"),
])
def test_fit_rejects_bad_options_in_one_line(tmp_path: Path, options, words) -> None:
    """Each option of the table, before anything is written; today many of these ended in a traceback (or a
    MemoryError) with the run folder already created."""
    volume = tmp_path / "two_steps"
    from gridinr_nerfstudio.data.volume_io import write_dataset

    rng = np.random.default_rng(0)
    write_dataset(volume, "two", {"v": [rng.uniform(size=(5, 6, 7)).astype(np.float32) for _ in range(2)]})
    message, output = run_fit_with(tmp_path, volume, options)
    assert_one_line(message, words.replace("VOLUME", str(volume)))
    assert not output.exists() and not (tmp_path / "references").exists()


def test_timesteps_all_with_a_missing_step_file(tmp_path: Path, three_steps: Path) -> None:
    message, output = run_fit_with(tmp_path, three_steps, {"pipeline.datamanager.dataparser.timesteps": "all"})
    assert_one_line(message, str(three_steps / "v" / "seq-v-3.raw"))
    assert not output.exists()


def test_ns_train_prints_one_line_and_no_config(tmp_path: Path) -> None:
    """The real command: no config dump, no traceback, exit status 1, no output folder."""
    np.save(tmp_path / "constant.npy", np.zeros((4, 4, 4), np.uint8))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "nerfstudio.scripts.train", "gridinr-fit",
         "--pipeline.datamanager.dataparser.data", str(tmp_path / "constant.npy"),
         "--output-dir", str(tmp_path / "outputs"), "--vis", "tensorboard"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 1
    assert result.stdout.strip() == ""
    assert result.stderr.strip().splitlines() == [
        f"gridinr-fit: error: {tmp_path / 'constant.npy'}: variable 'value' t=1 is constant (every voxel is 0): "
        "its renderings are blank, nothing to fit"
    ]
    assert not (tmp_path / "outputs").exists()


def run_edit(tmp_path: Path, stage1_config: Path, **model_overrides) -> tuple[str, Path]:
    output = tmp_path / "edit-outputs"
    config = short_run(edit_trainer_config(), output, "bad", model_overrides.pop("max_num_iterations", 4))
    config.pipeline.stage1_config = stage1_config
    for key, value in model_overrides.items():
        setattr(config.pipeline.model, key, value)
    with pytest.raises(SystemExit) as exit_info:
        ns_train_main(config)
    return str(exit_info.value.code), output


def run_edit_with(tmp_path: Path, stage1_config: Path, options: dict, method=edit_trainer_config) -> tuple[str, Path]:
    output = tmp_path / "edit-outputs"
    config = short_run(method(), output, "bad", 4)
    config.pipeline.stage1_config = stage1_config
    config.pipeline.model.lam_clip = 0.0
    set_options(config, options)
    with pytest.raises(SystemExit) as exit_info:
        ns_train_main(config)
    return str(exit_info.value.code), output


@pytest.mark.parametrize("options, words", [
    ({"pipeline.datamanager.train_image_scale": 0.0}, "--pipeline.datamanager.train-image-scale must be in (0, 1], got 0.0"),
    ({"pipeline.datamanager.train_image_scale": 1.5}, "--pipeline.datamanager.train-image-scale must be in (0, 1]"),
    ({"data": Path("some/volume.npy")}, "--data some/volume.npy: gridinr-edit edits the volume of its stage-1 run and takes no --data"),
    ({"data": Path("outputs/x/gridinr-fit/y/config.yml")}, "(did you mean --pipeline.stage1-config?)"),
    ({"pipeline.datamanager.dataparser.image_size": 64}, "--pipeline.datamanager.dataparser.image-size 64: gridinr-edit takes it from its stage-1 run"),
    ({"pipeline.model.field.num_levels": 4}, "--pipeline.model.field.num-levels 4: gridinr-edit takes it from its stage-1 run"),
    ({"pipeline.model.lam_pix": 0.0}, "lam-clip and --pipeline.model.lam-pix are both 0 and no colour target: nothing to train"),
    ({"pipeline.model.hidden_dim": 0}, "--pipeline.model.hidden-dim must be at least 1, got 0"),
    ({"pipeline.steps_per_render": 0}, "--pipeline.steps-per-render must be at least 1"),
])
def test_edit_rejects_bad_options_in_one_line(tmp_path: Path, tiny_fit_run: Path, options, words) -> None:
    """`--data` was silently ignored, volume and field options silently replaced by the stage-1 run's, and a
    train-image-scale of 0 stopped training after the run folder existed."""
    if "data" in options:  # as ns-train gets it: the alias is copied to the data manager before any check
        options = {"pipeline.datamanager.data": options["data"], **options}
    message, output = run_edit_with(tmp_path, tiny_fit_run, options)
    assert_one_line(message, words)
    assert not output.exists()


def test_edit_refuses_a_stage1_checkpoint_that_does_not_load(tmp_path: Path, tiny_fit_run: Path) -> None:
    import shutil

    stage1 = tmp_path / "stage1"
    shutil.copytree(tiny_fit_run.parent, stage1)
    (checkpoint,) = (stage1 / "nerfstudio_models").iterdir()
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])  # killed mid-save by an older trainer
    for method in (edit_trainer_config, edit_fast_trainer_config):
        message, output = run_edit_with(tmp_path, stage1 / "config.yml", {}, method)
        assert_one_line(message, str(stage1 / "nerfstudio_models"), "none of the 1 step-*.ckpt checkpoints loads",
                        "in the stage-1 run")
        assert not output.exists()


def test_resume_refuses_a_checkpoint_that_does_not_load(tmp_path: Path, tiny_fit_run: Path) -> None:
    """`--load-dir` of a run whose checkpoints are all broken: one line, the run folder untouched, nothing new."""
    import shutil

    run = tmp_path / "outputs" / "builtin-default" / "gridinr-fit" / "tiny"
    shutil.copytree(tiny_fit_run.parent, run)
    (checkpoint,) = (run / "nerfstudio_models").iterdir()
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    config = short_run(fit_trainer_config(), tmp_path / "outputs", "{timestamp}", 400)
    config.load_dir = run / "nerfstudio_models"
    with pytest.raises(SystemExit) as exit_info:
        ns_train_main(config)
    assert_one_line(str(exit_info.value.code), f"--load-dir {run / 'nerfstudio_models'}: none of the 1 step-*.ckpt")
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
    assert [path.name for path in (tmp_path / "outputs" / "builtin-default" / "gridinr-fit").iterdir()] == ["tiny"]
    config.load_dir = None
    config.load_checkpoint = checkpoint
    with pytest.raises(SystemExit) as exit_info:
        ns_train_main(config)
    assert_one_line(str(exit_info.value.code), f"{checkpoint}: checkpoint does not load")


def test_edit_rejects_bad_stage1_config(tmp_path: Path, tiny_fit_run: Path) -> None:
    truncated = tmp_path / "truncated" / "config.yml"
    truncated.parent.mkdir()
    text = tiny_fit_run.read_text()
    truncated.write_text(text[: text.index(":", len(text) // 2)])  # cut inside a key, past the middle
    not_yaml = tmp_path / "not_yaml.yml"
    not_yaml.write_text("{{{ this is: [not yaml\n")
    for path, words in [(truncated, "not a loadable run config"), (not_yaml, "not a loadable run config"),
                        (tmp_path / "missing.yml", "stage-1 config not found")]:
        message, output = run_edit(tmp_path, path, lam_clip=0.0)
        assert_one_line(message, str(path), words)
        assert not output.exists()


def test_edit_rejects_bad_clip_weights(tmp_path: Path, tiny_fit_run: Path) -> None:
    """Random bytes and another model's weights: one line naming the file (never torch's weights_only advice)."""
    model_name = register_tiny_clip(tmp_path / "clip_configs")
    other = dict(TINY_CLIP_CONFIG, text_cfg=dict(TINY_CLIP_CONFIG["text_cfg"], width=48))  # pos_embed width differs
    (tmp_path / "other_configs").mkdir()
    (tmp_path / "other_configs" / "gridinr-other-clip.json").write_text(json.dumps(other))
    import open_clip

    open_clip.add_model_config(tmp_path / "other_configs")
    other_weights = save_tiny_clip_weights("gridinr-other-clip", tmp_path / "other.bin")
    random_bytes = tmp_path / "random.bin"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for path, words in [(random_bytes, "not a readable weights file"),
                        (other_weights, f"not weights of open_clip model {model_name}")]:
        message, output = run_edit(tmp_path, tiny_fit_run, lam_clip=1.0, clip_model=model_name, clip_weights=path)
        assert_one_line(message, str(path), words)
        assert "weights_only" not in message
        assert not output.exists()
    good = save_tiny_clip_weights(model_name, tmp_path / "good.bin")
    message, output = run_edit(tmp_path, tiny_fit_run, lam_clip=1.0, clip_model=model_name, clip_weights=good,
                               max_num_iterations=0)  # the weights pass; the next check speaks
    assert_one_line(message, "--max-num-iterations must be at least 1")


def test_load_clip_gives_one_line_for_bad_weights(tmp_path: Path) -> None:
    from gridinr_nerfstudio.stages.edit.clip_loss import ClipWeightsError, load_clip

    model_name = register_tiny_clip(tmp_path / "clip_configs")
    random_bytes = tmp_path / "random.bin"
    random_bytes.write_bytes(b"\x93NOTAPICKLE" * 300)
    with pytest.raises(ClipWeightsError, match="not a readable weights file") as error:
        load_clip(model_name, random_bytes)
    assert "\n" not in str(error.value) and "weights_only" not in str(error.value)


def test_eval_never_writes_nan(tmp_path: Path, tiny_fit_run: Path, monkeypatch) -> None:
    """Blank or identical images give PSNR inf and its spread NaN: left out of the metrics (JSON and CSV), said once."""
    from nerfstudio.pipelines.base_pipeline import VanillaPipeline

    from gridinr_nerfstudio.runs import load_run_pipeline

    _, pipeline, _, _ = load_run_pipeline(tiny_fit_run, test_mode="test")
    pipeline.config.run_dir = tmp_path / "run"
    monkeypatch.setattr(VanillaPipeline, "get_average_image_metrics", lambda self, *args, **kwargs: {
        "psnr": float("inf"), "psnr_std": float("nan"), "ssim": 1.0, "ssim_std": 0.0,
        "fps": 10.0, "num_rays_per_sec": 1000.0})
    metrics = pipeline.get_average_eval_image_metrics(step=7)
    json.dumps(metrics, allow_nan=False)  # what ns-eval writes: valid JSON
    assert "psnr" not in metrics and "psnr_std" not in metrics and metrics["ssim"] == 1.0
    csv_text = (tmp_path / "run" / "metrics.csv").read_text()
    assert "nan" not in csv_text and "inf" not in csv_text.replace("lpips_unavailable", "")
