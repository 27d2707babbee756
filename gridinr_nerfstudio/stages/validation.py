"""Checks of a training run's inputs, before ns-train prints its config or creates the run folder.

ns-train would otherwise dump the config, write `config.yml`, build the pipeline and only then trip over a bad
volume, stage-1 run, CLIP weights file or option, as a long traceback. `GridINRTrainerConfig.set_timestamp`
(the first thing ns-train calls) runs `exit_on_bad_inputs`: one line naming the file or option and the problem,
exit status 1, nothing written. Imported lazily: it opens volumes and (for CLIP) open_clip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from gridinr_nerfstudio.data.default_volume import open_data
from gridinr_nerfstudio.data.volume_io import VolumeError, check_trainable


class InputError(ValueError):
    """A training input that cannot work; the message is one line."""


def _at_least(value: Any, minimum: float, option: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= minimum:
        raise InputError(f"{option} must be at least {minimum:g}, got {value!r}")


def check_dataparser(dataparser, data: Optional[Path] = None) -> None:
    """Options of the volume dataparser, then the volume itself (opens, renders, is not constant)."""
    prefix = "--pipeline.datamanager.dataparser"
    _at_least(dataparser.image_size, 1, f"{prefix}.image-size")
    _at_least(dataparser.num_train_views, 1, f"{prefix}.num-train-views")
    _at_least(dataparser.num_eval_views, 1, f"{prefix}.num-eval-views")
    _at_least(dataparser.render.num_samples, 1, f"{prefix}.render.num-samples")
    if not 0 < dataparser.fov_degrees < 180:
        raise InputError(f"{prefix}.fov-degrees must be between 0 and 180, got {dataparser.fov_degrees!r}")
    volume = open_data(data if data is not None else dataparser.data, variable=dataparser.variable,
                       timestep=dataparser.timestep, nan_policy=dataparser.nan_policy,
                       replace_value=dataparser.replace_value)
    check_trainable(volume)


def check_fit(pipeline) -> None:
    datamanager = pipeline.datamanager
    if datamanager.batch_size != 0:  # 0: the device's default (device_defaults.py)
        _at_least(datamanager.batch_size, 1, "--pipeline.datamanager.batch-size (or 0 for the device's default)")
    check_dataparser(datamanager.dataparser, datamanager.data)


def check_edit(pipeline) -> None:
    """The stage-1 run (its config, a checkpoint, its volume), the edit's options and its CLIP weights."""
    from gridinr_nerfstudio.runs import load_run_config

    if pipeline.stage1_config is None:
        raise InputError("gridinr-edit needs --pipeline.stage1-config PATH/config.yml of a gridinr-fit run")
    path = Path(pipeline.stage1_config)
    if not path.is_file():
        raise InputError(f"{path}: stage-1 config not found (pass the config.yml of a gridinr-fit run)")
    stage1 = load_run_config(path)  # RunConfigError: one line
    if getattr(stage1, "method_name", None) != "gridinr-fit":
        raise InputError(f"{path}: not a gridinr-fit run (method {getattr(stage1, 'method_name', None)!r})")
    if not any((path.parent / "nerfstudio_models").glob("step-*.ckpt")):
        raise InputError(f"{path.parent / 'nerfstudio_models'}: no step-*.ckpt checkpoint in the stage-1 run")
    check_dataparser(stage1.pipeline.datamanager.dataparser, stage1.pipeline.datamanager.data)
    _at_least(pipeline.datamanager.views_per_step, 1, "--pipeline.datamanager.views-per-step")
    _at_least(pipeline.steps_per_render, 1, "--pipeline.steps-per-render")
    model = pipeline.model
    _at_least(model.hidden_dim, 1, "--pipeline.model.hidden-dim")
    _at_least(model.num_layers, 1, "--pipeline.model.num-layers")
    _at_least(model.lam_clip, 0, "--pipeline.model.lam-clip")
    _at_least(model.lam_pix, 0, "--pipeline.model.lam-pix")
    if model.lam_clip > 0:
        from gridinr_nerfstudio.stages.edit.clip_loss import check_clip_weights

        _at_least(model.clip_crops, 1, "--pipeline.model.clip-crops")
        if model.target_image is not None and not Path(model.target_image).is_file():
            raise InputError(f"{model.target_image}: target image not found (--pipeline.model.target-image)")
        check_clip_weights(model.clip_model, model.clip_weights or model.clip_pretrained)


def check_training_inputs(config) -> None:
    """Raise a one-line error (InputError, VolumeError, RunConfigError, ClipWeights*) for inputs that cannot train."""
    _at_least(config.max_num_iterations, 1, "--max-num-iterations")
    if hasattr(config.pipeline, "stage1_config"):
        check_edit(config.pipeline)
    else:
        check_fit(config.pipeline)


def exit_on_bad_inputs(config) -> None:
    """check_training_inputs, turning its error into `METHOD: error: ...` on stderr and exit status 1."""
    from gridinr_nerfstudio.stages.edit.clip_loss import ClipWeightsError, ClipWeightsUnavailable

    try:
        check_training_inputs(config)
    except (InputError, VolumeError, ClipWeightsError, ValueError, ClipWeightsUnavailable, OSError) as error:
        message = " ".join(str(error).split("\n"))
        raise SystemExit(f"{config.method_name}: error: {message}") from None
