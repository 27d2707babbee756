"""Checks of a training run's inputs, before ns-train prints its config or creates the run folder.

ns-train would otherwise dump the config, write `config.yml`, build the pipeline and only then trip over a bad
volume, stage-1 run, checkpoint, CLIP weights file or option, as a long traceback. `GridINRTrainerConfig.set_timestamp`
(the first thing ns-train calls) runs `exit_on_bad_inputs`: one line naming the file or option and the problem,
exit status 1, nothing written. In order: every option against its row of `stages/option_table.py`; what
gridinr-edit takes from its stage-1 run and must not be given; a resume (`stages/resume.py`: the checkpoint loads,
the run's settings, where it continues); the field's memory; the volume (every selected time step); the stage-1
run and its checkpoint; CLIP weights. Imported lazily: it opens volumes and (for CLIP) open_clip.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from gridinr_nerfstudio.data.default_volume import is_builtin, open_data
from gridinr_nerfstudio.data.timesteps import parse_timesteps, share_value_range
from gridinr_nerfstudio.data.volume_io import VolumeError, check_trainable, read_info
from gridinr_nerfstudio.stages.option_table import OPTION_TABLE, is_edit
from gridinr_nerfstudio.stages.options import first_bad_option, iter_options


class InputError(ValueError):
    """A training input that cannot work; the message is one line."""


DATAPARSER = "--pipeline.datamanager.dataparser"
ADOPTED_BY_EDIT = ("pipeline.datamanager.dataparser.", "pipeline.model.field.")
"""Options gridinr-edit takes from its stage-1 run (the volume, its views and reference look; the field)."""


def check_dataparser(dataparser, data: Optional[Path] = None):
    """The volume: every selected time step opens, and the selection renders and is not constant; returns the
    first selected step's volume (its value range places the edit's targets)."""
    source = data if data is not None else dataparser.data
    options = dict(variable=dataparser.variable, nan_policy=dataparser.nan_policy, replace_value=dataparser.replace_value)
    if dataparser.timesteps is None:
        volumes = [open_data(source, timestep=dataparser.timestep, **options)]
    else:
        total = 1 if is_builtin(source) else read_info(source).total_samples
        steps = parse_timesteps(dataparser.timesteps, dataparser.timestep, total,
                                f"{DATAPARSER}.timesteps {dataparser.timesteps!r} of {source}")
        volumes = [open_data(source, timestep=step, **options) for step in steps]  # a missing step file says so
        share_value_range(volumes)  # a sequence is constant only if all its steps are, together
    check_trainable(volumes[0])
    return volumes[0]


def machine_memory_bytes(device_type: str) -> Optional[int]:
    """Physical memory of the training device (None when unknown)."""
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_field_memory(config) -> None:
    """The hash tables with their gradients and Adam's two moments must fit the device (a 2^31-entry table
    otherwise ends in an allocation failure, or the machine swapping, after the run folder exists)."""
    import math

    from gridinr_nerfstudio.fields.hash_grid.geometry import tcnn_geometry

    settings = config.pipeline.model.field
    levels = settings.num_levels
    scale = math.exp((math.log(settings.max_resolution) - math.log(settings.base_resolution)) / (levels - 1)) if levels > 1 else 1.0
    entries = tcnn_geometry(levels, settings.log2_hashmap_size, settings.base_resolution, scale).num_entries
    timesteps = config.pipeline.datamanager.dataparser.timesteps
    needed = entries * settings.features_per_level * 4 * 4 * (1.5 if timesteps not in (None, "") else 1.0)
    available = machine_memory_bytes(config.machine.device_type)
    if available is not None and needed > available:
        raise InputError(
            f"--pipeline.model.field.log2-hashmap-size {settings.log2_hashmap_size} with {levels} levels of "
            f"{settings.features_per_level} features: the hash tables need {needed / 2**30:.1f} GiB with their "
            f"gradients and Adam state, more than the {available / 2**30:.1f} GiB of this {config.machine.device_type}")


def check_fit(config) -> None:
    check_field_memory(config)
    datamanager = config.pipeline.datamanager
    check_dataparser(datamanager.dataparser, datamanager.data)


def check_edit_options(config) -> None:
    """gridinr-edit renders the volume of its stage-1 run with that run's field: a volume, view or field option
    given here would be silently replaced, so it is refused (also `--data`)."""
    pipeline = config.pipeline
    if pipeline.model.stage1_checkpoint is not None:
        return  # a config prepared earlier (a resumed run's own): it holds the stage-1 values
    data = pipeline.datamanager.data if pipeline.datamanager.data is not None else config.data
    if data is not None:
        hint = " (did you mean --pipeline.stage1-config?)" if Path(data).name == "config.yml" else ""
        raise InputError(f"--data {data}: {config.method_name} edits the volume of its stage-1 run and takes no "
                         f"--data; give the gridinr-fit run as --pipeline.stage1-config RUN/config.yml{hint}")
    for option in iter_options(config):
        if option.path.startswith(ADOPTED_BY_EDIT) and option.value != option.default:
            raise InputError(f"{option.flag} {option.value!r}: {config.method_name} takes it from its stage-1 run "
                             "(set it when fitting, with gridinr-fit)")


def check_stage1_field(path: Path) -> None:
    """A stage-1 checkpoint that loads and holds a field."""
    from gridinr_nerfstudio.runs import read_checkpoint

    state = read_checkpoint(path, mmap=True)  # ValueError naming the file
    if not any(str(key).startswith("_model.field.") for key in state["pipeline"]):
        raise InputError(f"{path}: no '_model.field.*' weights: not a gridinr-fit checkpoint")


def check_edit(config) -> None:
    """The stage-1 run (its config, a checkpoint that loads, its volume), the edit's options and its CLIP weights."""
    from gridinr_nerfstudio.runs import load_run_config, read_newest_checkpoint

    pipeline = config.pipeline
    if pipeline.model.stage1_checkpoint is not None:  # resumed: the field copied into the run, the run's volume
        path = Path(pipeline.model.stage1_checkpoint)
        check_stage1_field(path if path.is_absolute() else config.get_base_dir() / path)
        volume = check_dataparser(pipeline.datamanager.dataparser, pipeline.datamanager.data)
    else:
        if pipeline.stage1_config is None:
            raise InputError(f"{config.method_name} needs --pipeline.stage1-config PATH/config.yml of a gridinr-fit run")
        path = Path(pipeline.stage1_config)
        if not path.is_file():
            raise InputError(f"{path}: stage-1 config not found (pass the config.yml of a gridinr-fit run)")
        stage1 = load_run_config(path)  # RunConfigError: one line
        if getattr(stage1, "method_name", None) != "gridinr-fit":
            raise InputError(f"{path}: not a gridinr-fit run (method {getattr(stage1, 'method_name', None)!r})")
        models = path.parent / "nerfstudio_models"
        try:
            newest = read_newest_checkpoint(models, mmap=True, report=None)[0]
        except FileNotFoundError as error:
            raise InputError(f"{error} in the stage-1 run") from None
        check_stage1_field(newest)
        volume = check_dataparser(stage1.pipeline.datamanager.dataparser, stage1.pipeline.datamanager.data)
    check_edit_targets(pipeline.model, volume)


def check_edit_targets(model, volume) -> None:
    """The targets file (or the command-line target): ranges, colours, readable palettes and images; CLIP weights
    only when a target needs CLIP (a run of colour targets needs none and says nothing about them)."""
    from gridinr_nerfstudio.stages.edit.clip_loss import read_rgb_image
    from gridinr_nerfstudio.stages.edit.targets import model_targets, needs_clip

    targets = model_targets(model, volume.value_min, volume.value_max)  # TargetError: one line
    if not targets and model.lam_pix == 0:
        raise InputError("--pipeline.model.lam-clip and --pipeline.model.lam-pix are both 0 and no colour target: "
                         "nothing to train")
    for target in targets:
        for file in (target.image, target.palette):
            if file is not None:
                read_rgb_image(file)  # ValueError naming the file
    if needs_clip(targets):
        from gridinr_nerfstudio.stages.edit.clip_loss import check_clip_weights

        if model.lam_clip <= 0:
            where = model.targets if model.targets is not None else "--pipeline.model.negative-prompts"
            raise InputError(f"{where}: prompt, image or negative-prompt targets need --pipeline.model.lam-clip > 0")
        check_clip_weights(model.clip_model, model.clip_weights or model.clip_pretrained)


def check_training_inputs(config, defaults: Any = None) -> None:
    """Raise a one-line error (InputError, VolumeError, RunConfigError, ResumeError, ClipWeights*) for inputs that
    cannot train. `defaults`: the method's default config (a resume takes the run's value where an option has
    its default); None when the method has none (then a resume keeps the given values)."""
    from gridinr_nerfstudio.stages.resume import announce_resume, plan_resume

    problem = first_bad_option(config, OPTION_TABLE)
    if problem is not None:
        raise InputError(problem)
    if is_edit(config):
        check_edit_options(config)
    plan = plan_resume(config, defaults if defaults is not None else config)
    if is_edit(config):
        check_edit(config)
    else:
        check_fit(config)
    if plan is not None:
        announce_resume(config, plan)


def exit_on_bad_inputs(config, defaults: Any = None) -> None:
    """check_training_inputs, turning its error into `METHOD: error: ...` on stderr and exit status 1."""
    from gridinr_nerfstudio.stages.edit.clip_loss import ClipWeightsError, ClipWeightsUnavailable

    try:
        check_training_inputs(config, defaults)
    except (InputError, VolumeError, ClipWeightsError, ValueError, ClipWeightsUnavailable, OSError) as error:
        message = " ".join(str(error).split("\n"))
        raise SystemExit(f"{config.method_name}: error: {message}") from None
