"""Stage 2 edits by parts: targets per value range (prompts, negative prompts, colours), with the tiny CLIP model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gridinr_nerfstudio.gridinr_config import edit_trainer_config
from gridinr_nerfstudio.stages.edit.clip_loss import clip_cosine
from gridinr_nerfstudio.transfer.transfer_mlp import interpolate_table


pytestmark = pytest.mark.usefixtures("keep_global_rng")


def edit_pipeline(stage1: Path, clip=None, **model_overrides):
    """A gridinr-edit pipeline set up as ns-train sets it up (test_mode 'val')."""
    config = edit_trainer_config()
    config.pipeline.stage1_config = stage1
    model = config.pipeline.model
    model.lam_clip = 0.0
    model.part_hidden_dim = 32
    if clip is not None:
        model.clip_model, model.clip_weights = clip
        model.clip_crops = 2
        model.lam_clip = 1.0
    for key, value in model_overrides.items():
        setattr(model, key, value)
    return config.pipeline.setup(device="cpu", test_mode="val")


def train(pipeline, steps: int, lr: float = 1e-2) -> list[dict]:
    groups = pipeline.model.get_param_groups()
    optimizer = torch.optim.Adam(groups["transfer_parts"] + groups["transfer_mlp"], lr=lr)
    history = []
    for step in range(steps):
        _, losses, _ = pipeline.get_train_loss_dict(step)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append({key: float(value) for key, value in losses.items()})
    return history


def write_targets(folder: Path, targets: list) -> Path:
    path = folder / "edits.json"
    path.write_text(json.dumps({"targets": targets}))
    return path


@torch.no_grad()
def part_cosines(pipeline, texts: dict[int, str]) -> dict[int, float]:
    """Cosine of each part's eval renders to a text, under the pipeline's CLIP."""
    model = pipeline.model
    model.eval()
    cameras = pipeline.datamanager.eval_dataset.cameras
    parts = model.render_parts(cameras, model.transfer_table(), list(texts))
    model.train()
    clip = pipeline.clip
    return {slot: float(clip_cosine(clip, parts[slot]["rgb"].clamp(0, 1), clip.encode_text(text)[0]).mean())
            for slot, text in texts.items()}


def test_a_prompt_target_changes_the_table_only_inside_its_range(tiny_fit_run, tiny_clip, tmp_path):
    torch.manual_seed(0)
    targets = write_targets(tmp_path, [{"range": [0.6, 1.0], "prompt": "glowing red bone"}])
    pipeline = edit_pipeline(tiny_fit_run, tiny_clip, targets=targets)
    model = pipeline.model
    warm = model.transfer_mlp.table().detach().clone()
    base = {key: value.clone() for key, value in model.transfer_mlp.state_dict().items()}
    history = train(pipeline, 6)
    assert set(history[0]) == {"pixel_loss", "target1_clip_loss"}
    table = model.transfer_table().detach()
    values = torch.linspace(0.0, 1.0, 20001)
    outside = values < 0.6
    for edited, unedited in zip(interpolate_table(table, values[outside]), interpolate_table(warm, values[outside])):
        assert torch.equal(edited, unedited)  # bit for bit: colour and opacity of every value below the range
    assert (table[-300:] - warm[-300:]).abs().max() > 1e-3  # the part itself moved
    assert all(torch.equal(value, base[key]) for key, value in model.transfer_mlp.state_dict().items())


def test_a_negative_prompt_lowers_the_cosine_to_its_text(tiny_fit_run, tiny_clip, tmp_path):
    """The same edit (same seed, views and crops) with and without a negative prompt: with it, the renders end up
    less like the negative text (the positive prompt alone may pull them towards it, as here)."""
    cosines = {}
    for name, negative in (("without", []), ("with", ["a grey fog"])):
        torch.manual_seed(0)
        targets = write_targets(tmp_path, [{"range": [0.0, 1.0], "prompt": "a glowing orange molecule",
                                            "negative": negative, "negative_weight": 1.0}])
        pipeline = edit_pipeline(tiny_fit_run, tiny_clip, targets=targets, lam_pix=0.0)
        cosines["start"] = part_cosines(pipeline, {0: "a grey fog"})[0]
        train(pipeline, 15)
        cosines[name] = part_cosines(pipeline, {0: "a grey fog"})[0]
    assert cosines["with"] < cosines["without"] - 0.05, cosines


def test_two_targets_on_disjoint_ranges_each_move_their_own_part_towards_their_own_prompt(tiny_fit_run, tiny_clip,
                                                                                          tmp_path):
    torch.manual_seed(0)
    prompts = {0: "a glowing orange molecule", 1: "a deep blue ocean"}
    targets = write_targets(tmp_path, [{"range": [0.0, 0.45], "prompt": prompts[0]},
                                       {"range": [0.55, 1.0], "prompt": prompts[1]}])
    pipeline = edit_pipeline(tiny_fit_run, tiny_clip, targets=targets, lam_pix=0.0)
    model = pipeline.model
    warm = model.transfer_mlp.table().detach().clone()
    before = part_cosines(pipeline, prompts)
    history = train(pipeline, 20)
    assert set(history[-1]) == {"target1_clip_loss", "target2_clip_loss"}
    after = part_cosines(pipeline, prompts)
    for slot in prompts:
        assert after[slot] > before[slot] + 0.01, (before, after)
    # Each residual stayed inside its own range: the gap between the ranges keeps the warm start.
    values = torch.linspace(0.451, 0.549, 500)
    for edited, unedited in zip(interpolate_table(model.transfer_table().detach(), values), interpolate_table(warm, values)):
        assert torch.equal(edited, unedited)


def test_two_colour_targets_need_no_clip_and_recolour_each_part_towards_its_colours(tiny_fit_run, tmp_path, capsys):
    torch.manual_seed(0)
    targets = write_targets(tmp_path, [{"range": [0.05, 0.5], "colors": ["#1f77b4", "#aec7e8"]},
                                       {"range": [0.6, 1.0], "colors": ["#2ca02c"]}])
    pipeline = edit_pipeline(tiny_fit_run, targets=targets, clip_model="no-such-model")  # CLIP is never loaded
    assert pipeline.clip is None and "CLIP" not in capsys.readouterr().out
    model = pipeline.model
    cameras = pipeline.datamanager.eval_dataset.cameras
    warm = model.transfer_mlp.table().detach().clone()
    before = model.target_eval_metrics(cameras, [])
    train(pipeline, 25)
    after = model.target_eval_metrics(cameras, [])
    for name in ("target1_color_distance", "target2_color_distance"):
        assert after[name] < 0.6 * before[name], (before, after)
    table = model.transfer_table().detach()
    assert torch.equal(table[:, 3], warm[:, 3])  # colour targets leave opacity as it was, everywhere


def test_targets_file_errors_name_the_file_and_the_problem(tmp_path):
    from gridinr_nerfstudio.stages.edit.targets import TargetError, load_targets_file

    cases = [
        ("{not json", "not JSON"),
        ('{"targets": []}', "at least one target"),
        ('{"targets": [{"range": [0.2, 0.1], "prompt": "x"}]}', "low < high"),
        ('{"targets": [{"range": [0.2, 0.5], "prompt": "x", "colors": ["red"]}]}', "exactly one of"),
        ('{"targets": [{"range": [0.2, 0.5], "colour": ["red"]}]}', "unknown key(s) colour"),
        ('{"targets": [{"range": [0.2, 0.5], "palette": "missing.png"}]}', "palette"),
        ('{"targets": [{"range": [0.2, 0.5], "colors": ["#zz0000"]}]}', "is not a colour"),
        ('{"targets": [{"range": [300, 400], "units": "data", "prompt": "x"}]}', "outside the data range [0, 255]"),
        ('{"targets": [{"range": [0.2, 0.5], "prompt": "x", "weight": -1}]}', "weight must be a number >= 0"),
    ]
    for index, (text, words) in enumerate(cases):
        path = tmp_path / f"edits{index}.json"
        path.write_text(text)
        with pytest.raises(TargetError) as error:
            load_targets_file(path, 0.0, 255.0)
        message = str(error.value)
        assert message.startswith(str(path)) and words in message and "\n" not in message, message


def test_targets_file_of_the_issue_parses_with_data_units_and_relative_files(tmp_path):
    import imageio.v3 as iio
    import numpy as np

    from gridinr_nerfstudio.stages.edit.targets import load_targets_file

    iio.imwrite(tmp_path / "tissue.png", np.full((8, 8, 3), 200, np.uint8))
    iio.imwrite(tmp_path / "photo.jpg", np.full((8, 8, 3), 90, np.uint8))
    path = write_targets(tmp_path, [
        {"range": [0.6, 1.0], "prompt": "glowing red bone", "negative": ["grey"], "weight": 1.0},
        {"range": [0.2, 0.5], "image": "tissue.png"},
        {"range": [0.0, 0.2], "colors": ["#1f77b4", "#aec7e8"]},
        {"range": [0.0, 1.0], "palette": "photo.jpg", "units": "normalized"},
        {"range": [-50, 150], "units": "data", "soft": 10, "palette": "ocean", "opacity": True},
    ])
    targets = load_targets_file(path, -100.0, 300.0)
    assert [t.kind for t in targets] == ["clip", "clip", "color", "color", "color"]
    assert targets[0].needs_clip and targets[0].negative == ["grey"] and not targets[2].needs_clip
    assert targets[1].image == tmp_path / "tissue.png" and targets[3].palette == tmp_path / "photo.jpg"
    assert targets[4].palette.name == "ocean.png" and targets[4].changes_opacity and not targets[2].changes_opacity
    assert (targets[4].low, targets[4].high, targets[4].softness) == pytest.approx((0.125, 0.625, 0.025))


def test_viewer_adds_retargets_and_removes_targets_live(tiny_fit_run, tiny_clip):
    from gridinr_nerfstudio.stages.edit.target_controls import FOLDER

    pipeline = edit_pipeline(tiny_fit_run, tiny_clip, target_colors=["#ff0000"], target_range=(0.5, 1.0))
    assert pipeline.clip is None  # colour targets: CLIP is not loaded until a target needs it
    model = pipeline.model
    controls = getattr(model, FOLDER)
    first = controls.slots[0]
    assert first.open and first.elements["b_text"].value == "#ff0000" and first.elements["c_range"].value == (0.5, 1.0)
    assert not controls.slots[1].open  # free slots are hidden

    def edit(element, value):  # what viser does on a browser edit, then nerfstudio calls the hook
        element.value = value
        element.cb_hook(element)

    # Retarget: the range slider moves the part, its residual stays.
    edit(first.elements["c_range"], (0.3, 0.9))
    assert model.part_transfer.ranges[0, :2].tolist() == pytest.approx([0.3, 0.9])
    # Add a prompt target in the next slot: CLIP loads on demand.
    slot = controls.add()
    assert slot == 1 and controls.slots[1].open
    controls.slots[1].elements["c_range"].value = (0.0, 0.25)
    edit(controls.slots[1].elements["b_text"], "a deep blue ocean")
    assert model.targets[1].prompt == "a deep blue ocean" and model.scored[1].clip_loss is not None
    assert model.clip is not None
    _, losses, _ = pipeline.get_train_loss_dict(0)
    assert {"target1_color_loss", "target2_clip_loss"} <= set(losses)
    # A bad colour keeps the old target and says why.
    edit(controls.slots[0].elements["b_text"], "#zz0000")
    assert model.targets[0].colors == ["#ff0000"] and "is not a colour" in controls.Status.value
    # Remove: the part goes back to the warm start, bit for bit.
    with torch.no_grad():
        for parameter in model.part_transfer.residuals[1].parameters():
            parameter.add_(0.5)
    controls.slots[1].elements["f_remove"].cb_hook(controls.slots[1].elements["f_remove"])
    assert model.targets[1] is None and 1 not in model.scored
    table, warm = model.transfer_table().detach(), model.transfer_mlp.table().detach()
    outside_first = model.part_transfer.weights(0, table.shape[0]) == 0
    assert torch.equal(table[outside_first], warm[outside_first])


def test_ns_train_with_a_targets_file_logs_exports_and_reports_each_target(tiny_fit_run, tmp_path, capsys):
    """Colour targets through nerfstudio's trainer: per-target losses in train_log.csv, the checkpoint carries the
    targets (the file may go), the ParaView preset names each part, the report draws each target's curve."""
    from tiny_runs import train_tiny_edit

    from gridinr_nerfstudio.eval.train_log import read_train_log
    from gridinr_nerfstudio.export.source import from_run
    from gridinr_nerfstudio.scripts.export import main as export_main
    from gridinr_nerfstudio.scripts.report import _train_panels

    targets = write_targets(tmp_path, [{"range": [0.05, 0.5], "colors": ["#1f77b4"], "name": "shell"},
                                       {"range": [0.6, 1.0], "palette": "ocean"}])

    def configure(config):
        config.pipeline.model.targets = targets
        config.pipeline.model.clip_model = "no-such-model"  # never loaded: colour targets need no CLIP

    edit_config = train_tiny_edit(tmp_path / "runs", tiny_fit_run, iterations=4, configure=configure)
    assert "CLIP" not in capsys.readouterr().out
    log = read_train_log(edit_config.parent / "train_log.csv")
    assert {"Train Loss Dict/target1_color_loss", "Train Loss Dict/target2_color_loss"} <= set(log)
    assert _train_panels(log)["each target's loss (edits by part)"] == ["Train Loss Dict/target1_color_loss",
                                                                       "Train Loss Dict/target2_color_loss"]
    targets.unlink()  # the run keeps its targets in its checkpoint
    model = from_run(edit_config).model
    assert [t.label if t else None for t in model.targets[:3]] == ["shell", "palette ocean.png", None]
    assert model.scored[1].color_loss is not None
    output = tmp_path / "tf.json"
    assert export_main(["transfer-function", "--load-config", str(edit_config), "--output", str(output)]) == 0
    (preset,) = json.loads(output.read_text())
    assert [item["label"] for item in preset["gridinr_targets"]] == ["shell", "palette ocean.png"]
    assert preset["Annotations"][1].startswith("1: shell [") and len(preset["Annotations"]) == 4
    assert "target 2 (color): palette ocean.png" in capsys.readouterr().out
    rgb = torch.tensor(preset["RGBPoints"]).reshape(-1, 4)[:, 1:]
    assert torch.allclose(rgb, model.transfer_table().detach()[:, :3].clamp(0, 1).double().float(), atol=1e-6)


def test_target_controls_install_in_viser_and_the_range_slider_retargets(tiny_fit_run, tmp_path):
    """The controls as nerfstudio's viewer installs them (viser 0.2.7): the two-handled slider is viser's multi slider,
    hidden slots stay hidden, and a browser-side change of the range reaches the model."""
    import socket
    import time

    import viser
    from nerfstudio.viewer.utils import parse_object
    from nerfstudio.viewer.viewer_elements import ViewerElement

    from gridinr_nerfstudio.stages.edit.target_controls import FOLDER

    pipeline = edit_pipeline(tiny_fit_run, target_colors=["#ff0000"], target_range=(0.5, 1.0))
    model = pipeline.model
    found = dict(parse_object(pipeline, ViewerElement, "Custom Elements"))
    assert f"Custom Elements/model/{FOLDER}/Target 1/c_range" in found
    assert f"Custom Elements/model/{FOLDER}/Add target" in found
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = viser.ViserServer(host="127.0.0.1", port=port, verbose=False)
    try:
        for element in found.values():
            element.install(server)
        controls = getattr(model, FOLDER)
        slider = controls.slots[0].elements["c_range"]
        assert slider.gui_handle.value == (0.5, 1.0) and slider.gui_handle.visible
        assert not controls.slots[1].elements["c_range"].gui_handle.visible
        slider.gui_handle.value = (0.25, 0.75)  # as a browser edit arrives
        deadline = time.monotonic() + 10
        while model.part_transfer.ranges[0, 0].item() != pytest.approx(0.25) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert model.part_transfer.ranges[0, :2].tolist() == pytest.approx([0.25, 0.75])
        controls.add()
        assert controls.slots[1].elements["b_text"].gui_handle.visible
    finally:
        server.stop()


def test_part_and_training_renders_take_the_fused_path_with_the_torch_paths_gradient(tiny_fit_run, tmp_path,
                                                                                      monkeypatch):
    """The whole training view and every part render go through the fused ray marcher on the CPU (one
    `render_fused` call per view and part), and the residuals' gradient equals the torch ray marcher's (through a
    smooth loss on every render: the colour distance sorts colours, which amplifies float differences)."""
    from gridinr_nerfstudio.rendering import fused_march

    calls = []
    original = fused_march.render_fused

    def counting(origins, *args, **kwargs):
        calls.append(origins.shape[0])
        return original(origins, *args, **kwargs)

    monkeypatch.setattr(fused_march, "render_fused", counting)
    targets = write_targets(tmp_path, [{"range": [0.05, 0.5], "colors": ["#1f77b4"], "opacity": True},
                                       {"range": [0.6, 1.0], "colors": ["#2ca02c"]}])
    pipeline = edit_pipeline(tiny_fit_run, targets=targets)
    model = pipeline.model
    model.config.train_early_stop_eps = 0.0  # the torch path stops per chunk of samples, the kernel per sample
    with torch.no_grad():  # residuals that are not zero, so the gradient flows through both parts' tables
        for slot in (0, 1):
            for parameter in model.part_transfer.residuals[slot].parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
    cameras = pipeline.datamanager.train_dataset.cameras[0:2]
    grads = []
    for kernel in ("1", "0"):
        monkeypatch.setenv("GRIDINR_FUSED_MARCH", kernel)
        model.part_transfer.zero_grad()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same stratified positions and colour projections
            outputs = model.get_view_outputs(cameras)
            renders = [outputs["rgb"]] + [part[key] for part in outputs["parts"].values() for key in part]
            sum(render.square().mean() for render in renders).backward()
        grads.append([p.grad.clone() for p in model.part_transfer.parameters() if p.grad is not None])
    pixels = int(cameras.width[0]) * int(cameras.height[0])
    assert calls == [pixels] * 6  # two views: the whole render and two part renders each, all fused
    assert len(grads[0]) == len(grads[1]) > 0
    for fused, reference in zip(*grads):
        assert torch.allclose(fused, reference, atol=1e-8, rtol=1e-3)
