"""Time-varying volumes: step selection, one field for a range of steps, per-step PSNR, renders at a time."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gridinr_nerfstudio.data.timesteps import parse_timesteps
from gridinr_nerfstudio.data.volume_io import VolumeError, write_dataset
from gridinr_nerfstudio.fields.volume_field import VolumeField, VolumeFieldSettings

STEPS = 3


def moving_ball_frames(size: int = 16, steps: int = STEPS) -> list[np.ndarray]:
    """uint8 frames (Z, Y, X) of a ball moving along x and growing."""
    axis = np.linspace(-1.0, 1.0, size)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    frames = []
    for step in range(steps):
        centre, radius = -0.5 + step * 1.0 / (steps - 1), 0.3 + 0.1 * step
        distance = np.sqrt((x - centre) ** 2 + y**2 + z**2)
        frames.append((250 * np.clip(1 - distance / radius, 0, 1) + 5 * step).astype(np.uint8))
    return frames


@pytest.fixture(scope="module")
def sequence_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("seq") / "ball", "ball", {"v": moving_ball_frames()})


@pytest.fixture(scope="module")
def sequence_run(sequence_data, tmp_path_factory) -> Path:
    from tiny_runs import train_tiny_fit

    return train_tiny_fit(tmp_path_factory.mktemp("seq-run"), data=sequence_data, iterations=200, timesteps="all")


@pytest.fixture(scope="module")
def sequence_pipeline(sequence_run):
    from nerfstudio.utils.eval_utils import eval_setup

    return eval_setup(sequence_run)[1]


def test_parse_timesteps():
    assert parse_timesteps(None, 2, 5, "d") == [2]
    assert parse_timesteps("all", 1, 4, "d") == [1, 2, 3, 4]
    assert parse_timesteps("3", 1, 4, "d") == [3]
    assert parse_timesteps("2:4", 1, 4, "d") == [2, 3, 4]
    for bad, message in (("0", "out of range"), ("2:5", "out of range"), ("3:2", "empty"), ("x", "must be")):
        with pytest.raises(VolumeError, match=f"^d: .*{message}"):
            parse_timesteps(bad, 1, 4, "d")


def test_step_grids_and_blends_between_steps():
    """At step k's time the field reads step k's grid (per-point and one-time paths agree); between two steps it
    blends their grids' features linearly; the shared grid and the MLP serve every step."""
    torch.manual_seed(0)
    settings = VolumeFieldSettings(num_levels=4, log2_hashmap_size=12, max_resolution=32, hidden_dim=16, backend="cpp",
                                   time_field="step_grids")
    field = VolumeField(torch.tensor([[-1.0] * 3, [1.0] * 3]), settings, num_times=3)
    unit = torch.rand(300, 3)
    for grid in field.step_encodings:
        torch.nn.init.uniform_(grid.params, -1, 1)
    shared = field.encoding(unit)
    for step, time in enumerate((0.0, 0.5, 1.0)):
        expected = field.mlp(torch.cat([shared, field.step_encodings[step](unit)], -1)).squeeze(-1)
        assert torch.allclose(field.forward_unit(unit, time), expected, atol=1e-6)
        assert torch.allclose(field.forward_unit(unit, torch.full((300,), time)), expected, atol=1e-6)
    blend = 0.75 * field.step_encodings[1](unit) + 0.25 * field.step_encodings[2](unit)
    expected = field.mlp(torch.cat([shared, blend], -1)).squeeze(-1)
    assert torch.allclose(field.forward_unit(unit, 0.625), expected, atol=1e-6)
    mixed = torch.tensor([0.0, 1.0, 0.5] * 100)
    per_point = field.forward_unit(unit, mixed)
    assert torch.allclose(per_point[1::3], field.forward_unit(unit, 1.0)[1::3], atol=1e-6)
    single = VolumeField(torch.tensor([[-1.0] * 3, [1.0] * 3]), settings)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(field) <= 2 * count(single)


def test_a_sequence_trains_and_reports_each_step(sequence_pipeline, sequence_data):
    """volume_psnr_t<N> for every step equals a numpy PSNR against that step's voxels (joint value range);
    volume_psnr is their mean; training batches hold points of every step."""
    model = sequence_pipeline.model
    metrics = sequence_pipeline.extra_eval_metrics()
    frames = [f.astype(np.float64) for f in moving_ball_frames()]
    low, high = min(f.min() for f in frames), max(f.max() for f in frames)
    size = frames[0].shape[0]
    grid = np.linspace(0, 1, size)
    zz, yy, xx = np.meshgrid(grid, grid, grid, indexing="ij")
    unit = torch.from_numpy(np.stack([xx, yy, zz], -1).reshape(-1, 3)).float()
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            predicted = model.field.forward_unit(unit, (step - 1) / (STEPS - 1)).numpy().astype(np.float64)
        target = ((frames[step - 1] - low) / (high - low)).reshape(-1)
        expected = 10 * np.log10(1 / np.mean((np.clip(predicted, 0, 1) - target) ** 2))
        assert math.isclose(metrics[f"volume_psnr_t{step}"], expected, rel_tol=1e-4)
    assert math.isclose(metrics["volume_psnr"], np.mean([metrics[f"volume_psnr_t{s}"] for s in (1, 2, 3)]))
    assert metrics["volume_psnr_t1"] > 15  # it trained (an untrained field scores ~ 5-10 dB)
    _, batch = sequence_pipeline.datamanager.next_train(0)
    assert sorted(set(batch["times"].tolist())) == [0.0, 0.5, 1.0]
    eval_cameras = sequence_pipeline.datamanager.eval_dataset.cameras
    assert eval_cameras.times is not None and len(eval_cameras) == STEPS * 2  # every eval view at every step
    assert sequence_pipeline.datamanager.includes_time  # nerfstudio's viewer shows its time slider


def test_renders_follow_the_camera_time(sequence_pipeline):
    """The moving ball: the first and last step render differently, and a camera time selects the step."""
    model = sequence_pipeline.model
    cameras = sequence_pipeline.datamanager.eval_dataset.cameras
    first = model.get_outputs_for_camera(cameras[0:1])["rgb"]
    last = model.get_outputs_for_camera(cameras[2 * (STEPS - 1) : 2 * (STEPS - 1) + 1])["rgb"]
    assert model.render_time == 1.0
    again = model.get_outputs_for_camera(cameras[0:1])["rgb"]
    assert (first - last).abs().mean() > 0.01
    assert torch.allclose(first, again)


def test_render_cli_time_range(sequence_run, tmp_path):
    import imageio.v3 as iio

    from gridinr_nerfstudio.scripts.render import main

    out = tmp_path / "frames"
    assert main(["orbit", "--load-config", str(sequence_run), "--output", str(out), "--frames", "3",
                 "--image-size", "24", "--elevation", "0", "--time-range", "1:3"]) == 0
    frames = [iio.imread(path).astype(float) for path in sorted(out.glob("*.png"))]
    assert len(frames) == 3 and np.abs(frames[0] - frames[2]).mean() > 1
    assert main(["orbit", "--load-config", str(sequence_run), "--output", str(tmp_path / "x"),
                 "--time-range", "1:9"]) == 1


def test_single_step_runs_have_no_time(tiny_fit_run):
    """A single-step run keeps its checkpoint layout (no latents) and reports one volume PSNR."""
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(tiny_fit_run)
    assert pipeline.model.field.num_times == 1
    assert not any("time_latents" in key for key in pipeline.model.state_dict())
    metrics = pipeline.extra_eval_metrics()
    assert not any(key.startswith("volume_psnr_t") for key in metrics)
    assert not pipeline.datamanager.includes_time and pipeline.datamanager.eval_dataset.cameras.times is None


def test_one_step_selected_by_timesteps_equals_timestep(tmp_path, sequence_data):
    from gridinr_nerfstudio.data.dataparser import VolumeDataParserConfig

    def volume(**kwargs):
        config = VolumeDataParserConfig(data=sequence_data, cache_dir=tmp_path, **kwargs)
        parser = config.setup()
        return parser, parser.volume

    parser_a, a = volume(timestep=2)
    parser_b, b = volume(timesteps="2")
    assert a.timestep == b.timestep == 2 and (a.value_min, a.value_max) == (b.value_min, b.value_max)
    assert not parser_b.includes_time
    parser_all, first = volume(timesteps="all")
    assert parser_all.includes_time and [v.timestep for v in parser_all.volumes] == [1, 2, 3]
    assert first.value_max == max(v.value_max for v in parser_all.volumes)  # one value range for the sequence


def test_stage2_trains_on_a_sequence(sequence_run, tmp_path):
    """gridinr-edit on a sequence run: the frozen field keeps its per-step grids and each view renders its step."""
    from nerfstudio.utils.eval_utils import eval_setup
    from tiny_runs import train_tiny_edit

    config = train_tiny_edit(tmp_path / "edit", sequence_run, iterations=2, lam_clip=0.0)
    _, pipeline, _, _ = eval_setup(config)
    model = pipeline.model
    assert model.field.num_times == STEPS
    cameras = pipeline.datamanager.eval_dataset.cameras
    first, last = model.render_views(cameras[0:1]), model.render_views(cameras[len(cameras) - 1 :])
    assert model.render_time == 1.0 and (first - last).abs().mean() > 0.005


def test_export_decodes_any_step_of_a_sequence(sequence_run, sequence_pipeline, tmp_path, capsys):
    """gridinr-export volume --timestep T decodes step T of a sequence field (from the run, or from its model
    file); a step outside the run fails in one line."""
    from gridinr_nerfstudio.scripts.export import main as export_main

    field = sequence_pipeline.model.field
    size = moving_ball_frames()[0].shape[0]
    grid = torch.linspace(0, 1, size)
    zz, yy, xx = torch.meshgrid(grid, grid, grid, indexing="ij")
    unit = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
    model_file = tmp_path / "field.safetensors"
    assert export_main(["model", "--load-config", str(sequence_run), "--output", str(model_file), "--no-psnr"]) == 0
    decoded = {}
    for step in (2, 3):
        with torch.no_grad():
            expected = field.forward_unit(unit, (step - 1) / (STEPS - 1)).clamp(0, 1).reshape(size, size, size).numpy()
        for origin in (["--load-config", str(sequence_run)], ["--model", str(model_file)]):
            output = tmp_path / f"step{step}-{origin[0].strip('-')}.npy"
            assert export_main(["volume", *origin, "--timestep", str(step), "--units", "normalized",
                                "--output", str(output)]) == 0
            decoded[step] = np.load(output)
            np.testing.assert_allclose(decoded[step], expected, atol=1e-5)
    assert np.abs(decoded[2] - decoded[3]).max() > 0.1  # the ball moved
    # A fraction between two steps decodes the field at that time (2.5: halfway between steps 2 and 3, t = 0.75).
    with torch.no_grad():
        expected = field.forward_unit(unit, 0.75).clamp(0, 1).reshape(size, size, size).numpy()
    output = tmp_path / "step2.5.npy"
    assert export_main(["volume", "--load-config", str(sequence_run), "--timestep", "2.5", "--units", "normalized",
                        "--output", str(output)]) == 0
    between = np.load(output)
    np.testing.assert_allclose(between, expected, atol=1e-5)
    assert np.abs(between - decoded[2]).max() > 1e-3 and np.abs(between - decoded[3]).max() > 1e-3
    capsys.readouterr()
    assert export_main(["volume", "--load-config", str(sequence_run), "--timestep", "3.5",
                        "--output", str(tmp_path / "bad.npy")]) == 1
    assert "got --timestep 3.5" in capsys.readouterr().err
    assert export_main(["volume", "--load-config", str(sequence_run), "--timestep", "4",
                        "--output", str(tmp_path / "bad.npy")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "time step(s) 1, 2, 3, got --timestep 4" in error[0]
