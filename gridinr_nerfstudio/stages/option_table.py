"""Every option of gridinr-fit and gridinr-edit(-fast), with its rule and what a resumed run does with it.

One row per option path (`*` stands for a dict key such as an optimizer group), for ours and for the nerfstudio
options our configs inherit. `tests/test_options.py` walks the methods' configs and fails on any option (other
than an on/off switch) without a row, and on rows no method has, so a new option cannot skip validation. The rules
run in `stages/validation.py` before ns-train prints its config or creates the run folder; what needs the volume,
the stage-1 run, a checkpoint or CLIP weights is marked `CheckedBy` and checked there. "change" rows may differ
when a run is resumed (`stages/resume.py`), "derived" ones are filled in when the run starts.
"""

from __future__ import annotations

from typing import Any, Dict

from gridinr_nerfstudio.stages.options import (
    Above,
    AtLeast,
    Between,
    Check,
    CheckedBy,
    Choice,
    Each,
    Entry,
    Finite,
    Free,
    OneOf,
    Optional_,
    Problem,
    Unsupported,
)


def is_edit(config: Any) -> bool:
    """gridinr-edit and gridinr-edit-fast (their pipeline edits a stage-1 run), as opposed to gridinr-fit."""
    return hasattr(config.pipeline, "stage1_config")


def _device_problem(device: Any, config: Any) -> Problem:
    import torch

    if device not in ("cpu", "cuda", "mps"):
        return "must be one of cpu, cuda, mps"
    if device == "cuda" and not torch.cuda.is_available():
        return "asks for CUDA, and torch sees no CUDA device here (use cpu)"
    if device == "mps" and not torch.backends.mps.is_available():
        return "asks for Apple's MPS, which torch cannot use here (use cpu)"
    return None


def _timesteps_problem(spec: Any, config: Any) -> Problem:
    from gridinr_nerfstudio.data.timesteps import timesteps_problem

    return timesteps_problem(spec)


def _colormap_problem(name: Any, config: Any) -> Problem:
    import matplotlib

    return None if name in matplotlib.colormaps else "is not a matplotlib colormap name (e.g. inferno, viridis, gray)"


def _preset_problem(name: Any, config: Any) -> Problem:
    from gridinr_nerfstudio.transfer.paraview import available_presets, load_preset

    try:
        load_preset(name)
    except (ValueError, OSError, KeyError) as error:
        if str(name).lower().endswith(".json"):
            return f"is not a readable ParaView preset file ({' '.join(str(error).split())})"
        return f"is neither a ParaView preset file (.json) nor a shipped preset {available_presets()}"
    return None


def _field_cache_problem(value: Any, config: Any) -> Problem:
    if isinstance(value, int) and not isinstance(value, bool) and (value in (-1, 0) or value >= 2):
        return None
    return "must be -1 (the INR itself), 0 (the volume's resolution, at most 256) or at least 2"


def _max_resolution_problem(value: Any, config: Any) -> Problem:
    base = config.pipeline.model.field.base_resolution
    if isinstance(value, int) and not isinstance(value, bool) and value >= base:
        return None
    return f"must be at least --pipeline.model.field.base-resolution ({base})"


def _fit_prompt_problem(value: Any, config: Any) -> Problem:
    if is_edit(config) or value is None:
        return None
    return "is not used by gridinr-fit (prompts are for gridinr-edit)"


def _accumulation_problem(steps: Any, config: Any) -> Problem:
    for group, count in dict(steps).items():
        if group not in config.optimizers:
            return f"names {group!r}, which is not an optimizer group ({', '.join(config.optimizers)})"
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            return f"must give each group at least 1 step ({group}: {count!r})"
    return None


def _backends() -> tuple:
    from gridinr_nerfstudio.fields.hash_grid.encoding import BACKENDS

    return BACKENDS


def _lpips_nets() -> tuple:
    from gridinr_nerfstudio.eval.metrics import LPIPS_BACKBONE_WEIGHTS

    return tuple(sorted(LPIPS_BACKBONE_WEIGHTS))


def _features_per_level() -> tuple:
    from gridinr_nerfstudio.fields.hash_grid.geometry import SUPPORTED_FEATURES_PER_LEVEL

    return SUPPORTED_FEATURES_PER_LEVEL


STEPS = " (0: never during training; every run still ends with a checkpoint and a full evaluation)"
SEED = Between(0, 2**32 - 1)  # numpy's generators take non-negative seeds below 2^32
PORT = Between(1, 65535)
DATAMANAGER = "nerfstudio's image data manager option: our batches are points (fit) or whole views (edit)"
CHANGE, DERIVED = "change", "derived"


def _row(rule, resume: str = "keep") -> Entry:
    return Entry(rule, resume)


OPTION_TABLE: Dict[str, Entry] = {
    # Where the run goes and what it is called (a resumed run continues in its own folder: stages/resume.py).
    "output_dir": _row(Free("the runs' root folder, created when the run starts"), DERIVED),
    "method_name": _row(Free("set by the method")),
    "experiment_name": _row(Free("a folder name (default: the volume's name)"), DERIVED),
    "project_name": _row(Free("a label for wandb/comet"), CHANGE),
    "timestamp": _row(Free("the run folder's name (default: the start time)"), DERIVED),
    "relative_model_dir": _row(Free("checkpoint folder inside the run folder")),
    # Machine.
    "machine.seed": _row(SEED, CHANGE),
    "machine.num_devices": _row(AtLeast(1), CHANGE),
    "machine.num_machines": _row(AtLeast(1), CHANGE),
    "machine.machine_rank": _row(AtLeast(0), CHANGE),
    "machine.dist_url": _row(Free("nerfstudio's distributed address"), CHANGE),
    "machine.device_type": _row(Check(_device_problem, "cpu, cuda or mps, and available here"), CHANGE),
    "cpu_threads": _row(Choice(), CHANGE),  # how a CPU run picks its threads (thread_policy.py), not what it trains
    # Logging and viewer: how a run is watched.
    "logging.relative_log_dir": _row(Free("logger folder inside the run folder"), CHANGE),
    "logging.steps_per_log": _row(AtLeast(1), CHANGE),
    "logging.max_buffer_size": _row(AtLeast(1), CHANGE),
    "logging.local_writer.stats_to_track": _row(Free("event names (tyro checks them)"), CHANGE),
    "logging.local_writer.max_log_size": _row(AtLeast(0), CHANGE),
    "logging.profiler": _row(Choice(), CHANGE),
    "viewer.relative_log_filename": _row(Free("a file name inside the run folder"), CHANGE),
    "viewer.websocket_port": _row(Optional_(PORT), CHANGE),
    "viewer.websocket_port_default": _row(PORT, CHANGE),
    "viewer.websocket_host": _row(Free("an address to listen on (README, Viewer access)"), CHANGE),
    "viewer.num_rays_per_chunk": _row(AtLeast(1), CHANGE),
    "viewer.max_num_display_images": _row(AtLeast(0), CHANGE),
    "viewer.image_format": _row(Choice(), CHANGE),
    "viewer.jpeg_quality": _row(Between(1, 100), CHANGE),
    "viewer.camera_frustum_scale": _row(Above(0), CHANGE),
    "vis": _row(Choice(), CHANGE),
    # Length, checkpoints, evaluations, resuming.
    "max_num_iterations": _row(AtLeast(1), CHANGE),
    "steps_per_save": _row(AtLeast(0, STEPS), CHANGE),
    "steps_per_eval_batch": _row(AtLeast(0, STEPS), CHANGE),
    "steps_per_eval_image": _row(AtLeast(0, STEPS), CHANGE),
    "steps_per_eval_all_images": _row(AtLeast(0, STEPS), CHANGE),
    "gradient_accumulation_steps": _row(Check(_accumulation_problem, "{optimizer group: steps >= 1}")),
    "load_dir": _row(CheckedBy("stages/resume.py (a run's nerfstudio_models with a checkpoint that loads)"), CHANGE),
    "load_step": _row(Optional_(AtLeast(0)), CHANGE),
    "load_checkpoint": _row(CheckedBy("stages/resume.py (a checkpoint file that loads)"), CHANGE),
    "load_config": _row(Free("read by ns-train itself before any check (nerfstudio's unsafe loader: README, "
                             "Trust)"), CHANGE),
    "data": _row(CheckedBy("the volume check (gridinr-fit; gridinr-edit refuses it: its volume is the stage-1 "
                           "run's)")),
    "prompt": _row(Free("nerfstudio's alias of --pipeline.model.prompt, copied there before the checks")),
    # Volume and views (gridinr-edit takes all of these from its stage-1 run: stages/validation.py).
    "pipeline.datamanager.data": _row(CheckedBy("the volume check (alias of ...dataparser.data)")),
    "pipeline.datamanager.dataparser.data": _row(CheckedBy("the volume check: opens, renders, is not constant")),
    "pipeline.datamanager.dataparser.variable": _row(CheckedBy("the volume check (a variable of the volume)")),
    "pipeline.datamanager.dataparser.timestep": _row(AtLeast(1, " (and a step of the volume)")),
    "pipeline.datamanager.dataparser.timesteps": _row(Optional_(Check(
        _timesteps_problem, "'all', N or A:B (1-based), steps of the volume"))),
    "pipeline.datamanager.dataparser.nan_policy": _row(OneOf(("error", "replace"))),
    "pipeline.datamanager.dataparser.replace_value": _row(Finite()),
    "pipeline.datamanager.dataparser.image_size": _row(AtLeast(1)),
    "pipeline.datamanager.dataparser.fov_degrees": _row(Between(0, 180, open_low=True, open_high=True)),
    "pipeline.datamanager.dataparser.camera_radius": _row(Above(0)),
    "pipeline.datamanager.dataparser.num_train_views": _row(AtLeast(1)),
    "pipeline.datamanager.dataparser.num_eval_views": _row(AtLeast(1)),
    "pipeline.datamanager.dataparser.render.colormap": _row(Check(_colormap_problem, "a matplotlib colormap")),
    "pipeline.datamanager.dataparser.render.preset": _row(Optional_(Check(
        _preset_problem, "a shipped ParaView preset or a preset .json file"))),
    "pipeline.datamanager.dataparser.render.opacity_low": _row(Between(0, 1)),
    "pipeline.datamanager.dataparser.render.opacity_high": _row(Between(0, 1)),
    "pipeline.datamanager.dataparser.render.opacity_scale": _row(Above(0, " (0 renders nothing)")),
    "pipeline.datamanager.dataparser.render.unit_distance": _row(Optional_(Above(0))),
    "pipeline.datamanager.dataparser.render.num_samples": _row(AtLeast(1)),
    "pipeline.datamanager.dataparser.render.background": _row(Each(Between(0, 1))),
    "pipeline.datamanager.dataparser.cache_dir": _row(Free("reference-rendering cache, created when needed"), CHANGE),
    "pipeline.datamanager.dataparser.preload_max_bytes": _row(AtLeast(0), CHANGE),
    # nerfstudio's image data manager options, which our data managers do not use.
    "pipeline.datamanager.masks_on_gpu": _row(Unsupported(DATAMANAGER)),
    "pipeline.datamanager.images_on_gpu": _row(Unsupported(DATAMANAGER)),
    "pipeline.datamanager.train_num_rays_per_batch": _row(Unsupported(DATAMANAGER + "; see --pipeline.datamanager.batch-size")),
    "pipeline.datamanager.train_num_images_to_sample_from": _row(Unsupported(DATAMANAGER)),
    "pipeline.datamanager.train_num_times_to_repeat_images": _row(Unsupported(DATAMANAGER)),
    "pipeline.datamanager.eval_num_rays_per_batch": _row(Unsupported(DATAMANAGER)),
    "pipeline.datamanager.eval_num_images_to_sample_from": _row(Unsupported(DATAMANAGER)),
    "pipeline.datamanager.eval_num_times_to_repeat_images": _row(Unsupported(DATAMANAGER)),
    "pipeline.datamanager.eval_image_indices": _row(Unsupported(DATAMANAGER + "; evaluations use every eval view")),
    "pipeline.datamanager.collate_fn": _row(Unsupported(DATAMANAGER)),
    "pipeline.datamanager.camera_res_scale_factor": _row(Unsupported(DATAMANAGER + "; see ...dataparser.image-size")),
    "pipeline.datamanager.patch_size": _row(Unsupported(DATAMANAGER)),
    "pipeline.datamanager.camera_optimizer": _row(Unsupported("our cameras are exact orbit cameras")),
    "pipeline.datamanager.pixel_sampler.*": _row(Unsupported(DATAMANAGER)),
    # Stage 1 batches.
    "pipeline.datamanager.batch_size": _row(AtLeast(0, " (0: the device's default)"), CHANGE),
    "pipeline.datamanager.sampling": _row(Choice()),
    "pipeline.datamanager.continuous_fraction": _row(Between(0, 1)),
    "pipeline.datamanager.subsample_factor": _row(AtLeast(1)),
    "pipeline.datamanager.subsample_fraction": _row(Between(0, 1)),
    "pipeline.datamanager.preload_max_bytes": _row(AtLeast(0), CHANGE),
    "pipeline.datamanager.seed": _row(SEED),
    "pipeline.datamanager.device_resident": _row(Choice()),
    "pipeline.datamanager.error_weighted_fraction": _row(Between(0, 1)),
    "pipeline.datamanager.prefetch": _row(Choice(), CHANGE),
    # Stage 2 views.
    "pipeline.datamanager.views_per_step": _row(AtLeast(1)),
    "pipeline.datamanager.train_image_scale": _row(Between(0, 1, open_low=True)),
    # Rendering and evaluation (both stages).
    "pipeline.model.enable_collider": _row(Unsupported("rays are clipped to the scene box by our ray marcher")),
    "pipeline.model.collider_params": _row(Unsupported("rays are clipped to the scene box by our ray marcher")),
    "pipeline.model.loss_coefficients": _row(Unsupported("nerfstudio's RGB loss weights; see --pipeline.model.loss "
                                                           "(fit) and lam-clip, lam-pix (edit)")),
    "pipeline.model.eval_num_rays_per_chunk": _row(Unsupported("see --pipeline.model.render-chunk-rays")),
    "pipeline.model.prompt": _row(Check(_fit_prompt_problem, "the edit's text target (gridinr-edit only)")),
    "pipeline.model.render_chunk_rays": _row(AtLeast(0, " (0: the device's default)"), CHANGE),
    "pipeline.model.occupancy_resolution": _row(AtLeast(1), CHANGE),
    "pipeline.model.field_cache_resolution": _row(Check(_field_cache_problem, "-1, 0 or >= 2"), CHANGE),
    "pipeline.model.field_cache_bricks": _row(AtLeast(0, " (0: decode the whole cache at once)"), CHANGE),
    "pipeline.model.field_cache_refresh_steps": _row(AtLeast(1), CHANGE),
    "pipeline.model.lpips_net": _row(OneOf(_lpips_nets), CHANGE),
    "pipeline.model.lpips_weights": _row(Free("without a readable file LPIPS is reported unavailable, with the "
                                              "reason"), CHANGE),
    # The field (stage 1; gridinr-edit takes it from its stage-1 run).
    "pipeline.model.field.num_levels": _row(AtLeast(1)),
    "pipeline.model.field.features_per_level": _row(OneOf(_features_per_level)),
    "pipeline.model.field.log2_hashmap_size": _row(Between(1, 31, note=" (the kernels index tables with 32-bit "
                                                                        "integers)")),
    "pipeline.model.field.base_resolution": _row(AtLeast(1)),
    "pipeline.model.field.max_resolution": _row(Check(_max_resolution_problem, ">= base-resolution")),
    "pipeline.model.field.hidden_dim": _row(AtLeast(1)),
    "pipeline.model.field.num_hidden_layers": _row(AtLeast(0, " (0: a linear decoder)")),
    "pipeline.model.field.backend": _row(OneOf(_backends), CHANGE),
    "pipeline.model.field.coarse_to_fine": _row(Between(0, 1)),
    "pipeline.model.field.time_field": _row(Choice()),
    "pipeline.model.loss": _row(Choice()),
    "pipeline.model.volume_psnr_chunk": _row(AtLeast(1), CHANGE),
    # Stage 2 model.
    "pipeline.model.stage1_checkpoint": _row(CheckedBy("gridinr-edit (set from --pipeline.stage1-config: the "
                                                       "stage-1 field copied into the edit run)"), DERIVED),
    "pipeline.model.hidden_dim": _row(AtLeast(1)),
    "pipeline.model.num_layers": _row(AtLeast(1)),
    "pipeline.model.target_image": _row(CheckedBy("the CLIP check (an image file)")),
    "pipeline.model.lam_clip": _row(AtLeast(0)),
    "pipeline.model.lam_color": _row(AtLeast(0)),
    # Stage 2 targets by part (stages/edit/targets.py).
    "pipeline.model.targets": _row(Optional_(CheckedBy("the targets check (a JSON file of targets: ranges, prompts, "
                                                       "images, colours, palettes)"))),
    "pipeline.model.target_colors": _row(CheckedBy("the targets check (matplotlib colours or [r, g, b])")),
    "pipeline.model.target_palette": _row(Optional_(CheckedBy("the targets check (an image file or a shipped "
                                                              "palette name)"))),
    "pipeline.model.target_range": _row(CheckedBy("the targets check (low < high, inside the data's range)")),
    "pipeline.model.target_units": _row(Choice()),
    "pipeline.model.target_softness": _row(AtLeast(0)),
    "pipeline.model.negative_prompts": _row(Free("texts (a target with negative prompts needs CLIP weights)")),
    "pipeline.model.negative_weight": _row(AtLeast(0)),
    "pipeline.model.max_targets": _row(AtLeast(1)),
    "pipeline.model.part_hidden_dim": _row(AtLeast(1)),
    "pipeline.model.part_num_layers": _row(AtLeast(0, " (0: a linear residual)")),
    "pipeline.model.color_directions": _row(AtLeast(1)),
    "pipeline.model.lam_pix": _row(AtLeast(0)),
    "pipeline.model.source_prompt": _row(Free("text")),
    "pipeline.model.clip_model": _row(CheckedBy("the CLIP check (an open_clip model whose weights load)")),
    "pipeline.model.clip_pretrained": _row(CheckedBy("the CLIP check (weights in the local cache)")),
    "pipeline.model.clip_weights": _row(CheckedBy("the CLIP check (a weights file of --pipeline.model.clip-model)")),
    "pipeline.model.clip_crops": _row(AtLeast(1)),
    "pipeline.model.train_early_stop_eps": _row(Between(0, 1, open_high=True)),
    "pipeline.model.second_clip_model": _row(Free("evaluation only; unavailable weights are reported, not fatal"),
                                             CHANGE),
    "pipeline.model.second_clip_pretrained": _row(Free("evaluation only"), CHANGE),
    # Pipelines.
    "pipeline.run_dir": _row(Free("set to the run folder when the run starts"), DERIVED),
    "pipeline.stage": _row(Free("the stage's name in metrics.csv")),
    "pipeline.stage1_config": _row(CheckedBy("the stage-1 check (a gridinr-fit run with a checkpoint that loads)")),
    "pipeline.steps_per_render": _row(AtLeast(1), CHANGE),
    # Optimizers and schedules, per parameter group.
    "optimizers.*.optimizer.lr": _row(Above(0)),
    "optimizers.*.optimizer.eps": _row(AtLeast(0)),
    "optimizers.*.optimizer.max_norm": _row(Optional_(Above(0))),
    "optimizers.*.optimizer.weight_decay": _row(AtLeast(0)),
    "optimizers.*.optimizer.mode": _row(Choice(), CHANGE),
    "optimizers.*.optimizer.fused": _row(Free("torch's fused Adam kernel or not (None: torch decides)"), CHANGE),
    "optimizers.*.scheduler": _row(Free("None: a constant learning rate")),
    "optimizers.*.scheduler.lr_final": _row(Above(0)),
    "optimizers.*.scheduler.max_steps": _row(Free("set from --max-num-iterations when the run starts"), DERIVED),
}
"""option path -> rule and resume policy. Switches (bool options) need no row, unless they have a policy."""

SWITCHES_THAT_MAY_CHANGE = ("mixed_precision", "use_grad_scaler", "save_only_latest_checkpoint", "log_gradients",
                            "start_paused", "load_scheduler", "final_evaluation", "logging.local_writer.enable",
                            "viewer.quit_on_train_completion", "viewer.make_share_url",
                            "viewer.default_composite_depth", "pipeline.model.accelerate",
                            "pipeline.model.compute_normals")
"""On/off options a resumed run may change (how it runs and is watched); other switches keep the run's value."""
