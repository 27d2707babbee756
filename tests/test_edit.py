"""Stage 2 (gridinr-edit): frozen field, learnable transfer MLP, CLIP and pixel losses, evaluation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gridinr_nerfstudio.gridinr_config import edit_trainer_config
from gridinr_nerfstudio.stages.edit.clip_loss import ClipWeightsUnavailable


def edit_pipeline(stage1_config: Path, lam_clip: float = 0.0, clip=None, target_image=None, lam_pix: float = 0.1, **model_overrides):
    """A gridinr-edit pipeline set up exactly as ns-train does (test_mode 'val')."""
    config = edit_trainer_config()
    config.pipeline.stage1_config = stage1_config
    model = config.pipeline.model
    model.lam_clip, model.lam_pix = lam_clip, lam_pix
    if clip is not None:
        model.clip_model, model.clip_weights = clip
        model.clip_crops = 2
    model.target_image = target_image
    for key, value in model_overrides.items():
        setattr(model, key, value)
    return config.pipeline.setup(device="cpu", test_mode="val")


def train_steps(pipeline, steps: int, lr: float = 5e-3) -> list[dict]:
    groups = pipeline.model.get_param_groups()  # the MLP trains without targets, the targets' residuals with them
    optimizer = torch.optim.Adam(groups["transfer_mlp"] + groups["transfer_parts"], lr=lr)
    history = []
    for step in range(steps):
        _, losses, metrics = pipeline.get_train_loss_dict(step)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append({key: float(value) for key, value in {**losses, **metrics}.items()})
    return history


def test_gradients_reach_transfer_mlp_and_never_the_field(tiny_fit_run):
    pipeline = edit_pipeline(tiny_fit_run, lam_pix=1.0)
    model = pipeline.model
    _, losses, _ = pipeline.get_train_loss_dict(0)
    sum(losses.values()).backward()
    mlp_grads = [p.grad for p in model.transfer_mlp.parameters()]
    assert all(g is not None for g in mlp_grads) and sum(float(g.abs().sum()) for g in mlp_grads) > 0
    assert all(not p.requires_grad and p.grad is None for p in model.field.parameters())
    assert not model.field.training  # frozen field stays in eval mode
    assert set(model.get_param_groups()) == {"transfer_mlp", "transfer_parts"}
    assert all(p.grad is None for p in model.part_transfer.parameters())  # no targets: only the MLP trains


def test_field_is_the_stage1_field(tiny_fit_run):
    from nerfstudio.utils.eval_utils import eval_setup

    fitted = eval_setup(tiny_fit_run)[1].model.field
    edit = edit_pipeline(tiny_fit_run).model.field
    points = torch.rand(100, 3) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(fitted(points), edit(points), atol=1e-6)


def test_warm_start_matches_the_baseline_transfer_function(tiny_fit_run):
    model = edit_pipeline(tiny_fit_run).model
    values = torch.linspace(0, 1, 301)
    with torch.no_grad():
        rgb, sigma = model.transfer_mlp(values)
        base_rgb, base_sigma = model.transfer_function()(values)
    visible = base_sigma > 0  # the colour of fully transparent values never shows
    assert (rgb - base_rgb)[visible].abs().max() < 0.03
    assert (sigma - base_sigma).abs().max() < 0.03 * base_sigma.max()


def test_clip_term_falls_for_a_fixed_target(tiny_fit_run, tiny_clip):
    torch.manual_seed(0)
    pipeline = edit_pipeline(tiny_fit_run, lam_clip=1.0, lam_pix=0.0, clip=tiny_clip, prompt="a glowing orange molecule")
    history = train_steps(pipeline, 24, lr=1e-2)
    clip_losses = [h["target1_clip_loss"] for h in history]  # the command-line prompt: one target, all values
    assert sum(clip_losses[-6:]) / 6 < sum(clip_losses[:6]) / 6 - 0.01, clip_losses


def test_viewer_prompt_and_lam_pix_apply_without_restart(tiny_fit_run, tiny_clip):
    from gridinr_nerfstudio.stages.edit.target_controls import FOLDER

    pipeline = edit_pipeline(tiny_fit_run, lam_clip=1.0, clip=tiny_clip, prompt="a red molecule")
    model = pipeline.model
    before = model.scored[0].clip_loss.target_embedding.clone()
    text = getattr(model, FOLDER).slots[0].elements["b_text"]  # the command-line target's prompt box
    assert text.value == "a red molecule"
    text.value = "a blue jellyfish"  # what viser does on edit, then the viewer calls the hook
    text.cb_hook(text)
    expected = pipeline.clip.encode_text("a blue jellyfish")[0]
    assert torch.allclose(model.scored[0].clip_loss.target_embedding, expected) and not torch.allclose(before, expected)
    assert model.targets[0].prompt == "a blue jellyfish"
    model.viewer_lam_pix.value = 0.5
    model.viewer_lam_pix.cb_hook(model.viewer_lam_pix)
    _, losses, metrics = pipeline.get_train_loss_dict(0)
    mse = 10 ** (-float(metrics["psnr"]) / 10)
    assert abs(float(losses["pixel_loss"]) - 0.5 * mse) < 1e-4 * max(mse, 1e-3)


def test_image_target_pulls_renders_towards_it(tiny_fit_run, tiny_clip, tmp_path):
    """Target: the training views rendered with another colour map. CLIP alone moves renders towards it."""
    import imageio.v3 as iio

    torch.manual_seed(0)
    pipeline = edit_pipeline(tiny_fit_run, lam_clip=1.0, lam_pix=0.0, clip=tiny_clip, warm_start=True)
    model = pipeline.model
    target_settings = model.render_settings
    target_settings.colormap = "viridis"
    cameras = pipeline.datamanager.train_dataset.cameras[torch.tensor([0])]
    with torch.no_grad():
        baseline_mlp = {k: v.clone() for k, v in model.transfer_mlp.state_dict().items()}
        from gridinr_nerfstudio.data.volume_io import voxel_size_world
        from gridinr_nerfstudio.transfer.transfer_mlp import fit_to_transfer_function
    model.transfer_mlp.requires_grad_(True)  # (frozen while the prompt target is set: only its residual trains)
    fit_to_transfer_function(model.transfer_mlp, target_settings.transfer_function(voxel_size_world(model.volume)))
    model.transfer_mlp.requires_grad_(False)
    with torch.no_grad():
        target = model.render_views(cameras)[0].clamp(0, 1)
    model.transfer_mlp.load_state_dict(baseline_mlp)
    target_path = tmp_path / "target.png"
    iio.imwrite(target_path, (target.numpy() * 255).round().astype("uint8"))
    from gridinr_nerfstudio.stages.edit.targets import EditTarget

    model.set_target(0, EditTarget(image=target_path))  # as the viewer retargets

    def psnr_to_target() -> float:
        model.eval()
        with torch.no_grad():
            image = model.render_views(cameras)[0].clamp(0, 1)
        model.train()
        return float(-10 * torch.log10(((image - target) ** 2).mean()))

    before = psnr_to_target()
    train_steps(pipeline, 60, lr=2e-2)
    after = psnr_to_target()
    assert after > before + 1.0, (before, after)


def test_training_with_clip_needs_weights(tiny_fit_run):
    with pytest.raises(ClipWeightsUnavailable, match="clip-weights"):
        edit_pipeline(tiny_fit_run, lam_clip=1.0, clip=("ViT-B-16", Path("/nonexistent/open_clip_pytorch_model.bin")))


def test_edit_needs_a_stage1_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yml|stage-1"):
        edit_pipeline(tmp_path / "missing" / "config.yml")


def test_ns_train_edit_and_ns_eval(tiny_fit_run, tmp_path):
    """The whole stage 2 through nerfstudio's CLI code paths: training, renders, CSV, ns-eval."""
    from tiny_runs import train_tiny_edit

    edit_config = train_tiny_edit(tmp_path, tiny_fit_run, iterations=4)
    run_dir = edit_config.parent
    assert list((run_dir / "renders").glob("step_*.png"))
    output = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, "-m", "nerfstudio.scripts.eval", "--load-config", str(edit_config), "--output-path", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(output.read_text())["results"]
    for key in ("psnr", "ssim", "ms_per_frame", "rays_per_s"):
        assert math.isfinite(metrics[key])
    # Without a CLIP term the edit has no target: no CLIP score, and nothing said about CLIP weights.
    assert "clip_cosine" not in metrics and "clip_cosine" not in result.stdout
    assert "CLIP weights" not in " ".join(result.stdout.split())
    assert (run_dir / "renders" / "edit_000.png").exists() and (run_dir / "renders" / "reference_000.png").exists()
    assert ",edit," in (run_dir / "metrics.csv").read_text()


def test_eval_without_the_clip_weights_reports_clip_cosine_unavailable_with_the_reason(tiny_fit_run, tiny_clip,
                                                                                       tmp_path, capsys):
    """A run trained towards a prompt, evaluated where its CLIP weights are gone: the metrics leave clip_cosine out
    (writers need numbers) and say once why, naming the weights file; the other metrics are still reported."""
    from tiny_runs import train_tiny_edit

    from gridinr_nerfstudio.runs import load_run_pipeline

    name, weights = tiny_clip
    moved = tmp_path / "weights.bin"
    moved.write_bytes(weights.read_bytes())
    edit_config = train_tiny_edit(tmp_path / "run", tiny_fit_run, iterations=2, clip_model=name, clip_weights=moved,
                                  lam_clip=1.0)
    moved.unlink()
    capsys.readouterr()
    _, pipeline, _, _ = load_run_pipeline(edit_config, test_mode="test")
    metrics = pipeline.get_average_eval_image_metrics()
    output = " ".join(capsys.readouterr().out.split())
    assert "clip_cosine" not in metrics and math.isfinite(metrics["psnr"])
    assert output.count("clip_cosine is not reported") == 1 and str(moved) in output


@pytest.fixture(scope="module")
def c60_fit_run(shared_data, tmp_path_factory) -> Path:
    """A short stage-1 fit of c60 with the 'C60 Glow' preset, small views (the test budget)."""
    from tiny_runs import train_tiny_fit

    return train_tiny_fit(tmp_path_factory.mktemp("c60-fit"), data=shared_data("c60"), iterations=400, image_size=64,
                          full_field=True, preset="C60 Glow")


def test_pixel_term_alone_reproduces_c60_references(c60_fit_run):
    """From a random transfer MLP (no warm start), the pixel loss alone recovers the reference look: > 30 dB."""
    torch.manual_seed(0)
    pipeline = edit_pipeline(c60_fit_run, lam_clip=0.0, lam_pix=1.0, warm_start=False)
    pipeline.datamanager.config.views_per_step = 2
    train_steps(pipeline, 150, lr=1e-2)
    pipeline.eval()
    images = pipeline.render_eval_views()
    dataset = pipeline.datamanager.eval_dataset
    references = torch.stack([dataset.get_image_float32(i)[..., :3] for i in range(len(dataset))])
    psnr = float(-10 * torch.log10(((images - references) ** 2).mean()))
    assert psnr > 30.0, psnr
