"""A run folder: its config.yml read without running code, its checkpoints, and the pipeline set up from them.

nerfstudio writes config.yml with PyYAML's python tags and reads it back with `yaml.Loader`, which constructs
any Python object a file names (`!!python/object/apply:os.system [...]` runs a command). `load_run_config`
constructs only what a run config holds: dataclass configs and enums of nerfstudio and of this package, paths,
tuples and the classes their `_target` fields name; anything else fails with one line naming the file.
Configs written before the package layout moved (flat `gridinr_nerfstudio.<module>`) load through `OLD_LAYOUT`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import importlib
import os
import pathlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple

import yaml

ALLOWED_PACKAGES = ("nerfstudio.", "gridinr_nerfstudio.")
"""Modules whose dataclasses, enums and classes a run config may name."""
ALLOWED_NAMES = {"pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.Path", "builtins.tuple"}
"""Other names a run config may hold (paths; nerfstudio's `_target` of optimizers lives in torch.optim)."""
ALLOWED_PREFIXES = ALLOWED_PACKAGES + ("torch.optim.",)

OLD_LAYOUT = {
    "gridinr_nerfstudio.trainer_config.GridINRTrainerConfig": "gridinr_nerfstudio.gridinr_config.GridINRTrainerConfig",
    "gridinr_nerfstudio.trainer_config.HashGridAdamOptimizerConfig": "gridinr_nerfstudio.gridinr_config.HashGridAdamOptimizerConfig",
    "gridinr_nerfstudio.trainer_config.FusedAdamOptimizerConfig": "gridinr_nerfstudio.gridinr_config.FusedAdamOptimizerConfig",
    "gridinr_nerfstudio.trainer_config.LogLinearDecaySchedulerConfig": "gridinr_nerfstudio.gridinr_config.LogLinearDecaySchedulerConfig",
    "gridinr_nerfstudio.trainer_config.LogLinearDecayScheduler": "gridinr_nerfstudio.gridinr_config.LogLinearDecayScheduler",
    "gridinr_nerfstudio.hash_encoding.HashGridAdam": "gridinr_nerfstudio.fields.hash_grid.optim.HashGridAdam",
    "gridinr_nerfstudio.fit_pipeline.GridINRFitPipelineConfig": "gridinr_nerfstudio.stages.fit.pipeline.FitPipelineConfig",
    "gridinr_nerfstudio.fit_pipeline.GridINRFitPipeline": "gridinr_nerfstudio.stages.fit.pipeline.FitPipeline",
    "gridinr_nerfstudio.fit_model.GridINRFitModelConfig": "gridinr_nerfstudio.stages.fit.model.FitModelConfig",
    "gridinr_nerfstudio.fit_model.GridINRFitModel": "gridinr_nerfstudio.stages.fit.model.FitModel",
    "gridinr_nerfstudio.volume_datamanager.VolumeDataManagerConfig": "gridinr_nerfstudio.stages.fit.datamanager.FitDataManagerConfig",
    "gridinr_nerfstudio.volume_datamanager.VolumeDataManager": "gridinr_nerfstudio.stages.fit.datamanager.FitDataManager",
    "gridinr_nerfstudio.volume_dataparser.VolumeDataParserConfig": "gridinr_nerfstudio.data.dataparser.VolumeDataParserConfig",
    "gridinr_nerfstudio.volume_dataparser.VolumeDataParser": "gridinr_nerfstudio.data.dataparser.VolumeDataParser",
    "gridinr_nerfstudio.render_settings.RenderSettings": "gridinr_nerfstudio.rendering.settings.RenderSettings",
    "gridinr_nerfstudio.volume_field.VolumeFieldSettings": "gridinr_nerfstudio.fields.volume_field.VolumeFieldSettings",
    "gridinr_nerfstudio.edit_pipeline.GridINREditPipelineConfig": "gridinr_nerfstudio.stages.edit.pipeline.EditPipelineConfig",
    "gridinr_nerfstudio.edit_pipeline.GridINREditPipeline": "gridinr_nerfstudio.stages.edit.pipeline.EditPipeline",
    "gridinr_nerfstudio.edit_model.GridINREditModelConfig": "gridinr_nerfstudio.stages.edit.model.EditModelConfig",
    "gridinr_nerfstudio.edit_model.GridINREditModel": "gridinr_nerfstudio.stages.edit.model.EditModel",
    "gridinr_nerfstudio.edit_datamanager.EditDataManagerConfig": "gridinr_nerfstudio.stages.edit.datamanager.EditDataManagerConfig",
    "gridinr_nerfstudio.edit_datamanager.EditDataManager": "gridinr_nerfstudio.stages.edit.datamanager.EditDataManager",
}
"""Names in configs written before the layout moved (release 0.1, flat package) -> where they live now."""


_CHECKPOINT_CHOSEN = contextvars.ContextVar("gridinr_checkpoint_chosen", default=False)
"""True while `load_run_pipeline` sets a pipeline up: it has picked the checkpoint, nerfstudio's loader will not."""


class RunConfigError(ValueError):
    """A config.yml that is not a readable run config; the message is one line naming the file."""


def _resolve(dotted: str) -> Any:
    """The object a config names, if a run config may name it; raises yaml.YAMLError otherwise."""
    dotted = OLD_LAYOUT.get(dotted, dotted)
    if dotted not in ALLOWED_NAMES and not dotted.startswith(ALLOWED_PREFIXES):
        raise yaml.YAMLError(f"refusing to construct {dotted!r} (not part of a run config)")
    module_name, _, attribute = dotted.rpartition(".")
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise yaml.YAMLError(f"unknown name {dotted!r} ({error})") from None
    return value


class RunConfigLoader(yaml.SafeLoader):
    """SafeLoader plus the python tags nerfstudio's config.yml uses, limited to run-config classes."""


def _construct_name(loader: RunConfigLoader, suffix: str, node: yaml.Node) -> Any:
    value = _resolve(suffix)
    if not isinstance(value, type) and not callable(value):
        raise yaml.YAMLError(f"{suffix!r} is not a class or function")
    return value


def _construct_object(loader: RunConfigLoader, suffix: str, node: yaml.Node) -> Any:
    cls = _resolve(suffix)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise yaml.YAMLError(f"refusing to construct {suffix!r}: run configs hold dataclasses only")
    instance = cls.__new__(cls)
    yield instance
    state = loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode) else {}
    instance.__dict__.update(state)


def _construct_apply(loader: RunConfigLoader, suffix: str, node: yaml.Node) -> Any:
    target = _resolve(suffix)
    if not (isinstance(target, type) and (issubclass(target, enum.Enum) or issubclass(target, pathlib.PurePath))):
        raise yaml.YAMLError(f"refusing to call {suffix!r}: run configs apply only paths and enums")
    args = loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode) else []
    return target(*args)


RunConfigLoader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node)))
RunConfigLoader.add_multi_constructor("tag:yaml.org,2002:python/name:", _construct_name)
RunConfigLoader.add_multi_constructor("tag:yaml.org,2002:python/object:", _construct_object)
RunConfigLoader.add_multi_constructor("tag:yaml.org,2002:python/object/apply:", _construct_apply)


def load_run_config(path: Path):
    """The TrainerConfig saved in a run's config.yml, constructed without running code from the file."""
    from nerfstudio.engine.trainer import TrainerConfig

    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise RunConfigError(f"{path}: cannot read the run config ({error})") from None
    try:
        config = yaml.load(text, Loader=RunConfigLoader)
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise RunConfigError(f"{path}: not a loadable run config ({reason})") from None
    if not isinstance(config, TrainerConfig):
        raise RunConfigError(f"{path}: not a nerfstudio run config (found {type(config).__name__})")
    return config


def load_run_pipeline(
    config_path: Path,
    test_mode: Literal["test", "val", "inference"] = "inference",
    update_config: Optional[Callable[[Any], Any]] = None,
    device: Optional[Any] = None,
) -> Tuple[Any, Any, Path, int]:
    """Like nerfstudio's `eval_setup`, with the config read by `load_run_config`: (config, pipeline, ckpt, step).

    Checkpoints come from the run folder that holds `config_path`, and evaluations append to its metrics.csv
    (a copied or moved run uses its own files; nerfstudio's ns-eval follows the paths written in the config).
    `device` defaults to CUDA when available, else the CPU.
    """
    import torch
    from nerfstudio.configs.method_configs import all_methods

    config = load_run_config(config_path)
    if config.method_name in all_methods:
        config.pipeline.datamanager._target = all_methods[config.method_name].pipeline.datamanager._target
    if hasattr(config.pipeline, "run_dir"):
        config.pipeline.run_dir = Path(config_path).parent
    if update_config is not None:
        config = update_config(config)
    config.load_dir = Path(config_path).parent / "nerfstudio_models"
    checkpoint, step, state = read_newest_checkpoint(Path(config.load_dir))  # before the (slow) setup
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    chosen = _CHECKPOINT_CHOSEN.set(True)
    try:
        pipeline = config.pipeline.setup(device=device, test_mode=test_mode)
    finally:
        _CHECKPOINT_CHOSEN.reset(chosen)
    pipeline.eval()
    pipeline.load_pipeline(state["pipeline"], state["step"])
    return config, pipeline, checkpoint, step


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of a `step-NNNNNNNNN.ckpt` file name, or None for any other file (.DS_Store, partial saves)."""
    name = path.name
    if not (name.startswith("step-") and name.endswith(".ckpt")):
        return None
    digits = name[len("step-") : -len(".ckpt")]
    return int(digits) if digits.isdigit() else None


def list_checkpoints(folder: Path) -> List[Tuple[int, Path]]:
    """(step, path) of the `step-*.ckpt` files of `folder`, newest first; other files are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(step, path) for path in folder.iterdir() if path.is_file() and (step := checkpoint_step(path)) is not None]
    return sorted(found, reverse=True)


def read_checkpoint(path: Path, mmap: bool = False) -> Dict[str, Any]:
    """A checkpoint's state (weights_only); ValueError naming the file when it does not load or is not one.

    `mmap=True` maps the tensors instead of reading them: a cheap check that the file loads.
    """
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as error:
            if not mmap or "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # an old, non-zip file
    except Exception as error:  # truncated zip, bad pickle, foreign data
        reason = " ".join(str(error).split())[:200]
        raise ValueError(f"{path}: checkpoint does not load ({type(error).__name__}: {reason})") from None
    if not isinstance(state, dict) or "pipeline" not in state:
        raise ValueError(f"{path}: not a nerfstudio checkpoint (no pipeline state)")
    return state


def read_newest_checkpoint(folder: Path, mmap: bool = False,
                           report: Optional[Callable[[str], None]] = print) -> Tuple[Path, int, Dict[str, Any]]:
    """(path, step, state) of the newest checkpoint of `folder` that loads (weights_only).

    A checkpoint that does not load (truncated by a kill during the save, an older trainer's partial file) is
    skipped with one line (`report`; None: silently), and the next older one is tried.
    """
    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        raise FileNotFoundError(f"{folder}: no step-*.ckpt checkpoint")
    for step, path in checkpoints:
        try:
            state = read_checkpoint(path, mmap=mmap)
        except ValueError as error:
            if report is not None:
                report(f"{error}: skipped")
            continue
        return path, int(state.get("step", step)), state
    raise FileNotFoundError(f"{folder}: none of the {len(checkpoints)} step-*.ckpt checkpoints loads")


def exit_unless_nerfstudio_finds_a_checkpoint(folder: Path) -> None:
    """Exit with one line naming `folder` where nerfstudio's own loader (ns-eval, ns-viewer, ns-render:
    `eval_load_checkpoint`) would stop with a traceback: no step-*.ckpt (IndexError) or another file name beside
    them (ValueError). Called by the pipeline config's `setup`, the last of our code before nerfstudio picks the
    checkpoint. A missing folder is left to nerfstudio, which says so itself."""
    import sys

    folder = Path(folder)
    if _CHECKPOINT_CHOSEN.get() or not folder.is_dir():
        return  # our own loaders have picked the checkpoint already (and skip stray files)
    program = Path(sys.argv[0]).name or "nerfstudio"
    if not list_checkpoints(folder):
        raise SystemExit(f"{program}: error: {folder}: no step-*.ckpt checkpoint in the run folder (none was saved, "
                         "or it was removed): train it (again), or point --load-config at a run that has one")
    others = sorted(path.name for path in folder.iterdir() if checkpoint_step(path) is None)
    if others:
        raise SystemExit(f"{program}: error: {folder}: {', '.join(others)} beside the checkpoints: nerfstudio's "
                         "loader reads every file there as step-N.ckpt; move it away, or use gridinr-eval / "
                         "gridinr-render, which skip it")


def save_checkpoint_atomically(state: Dict[str, Any], path: Path, scratch_dir: Path) -> None:
    """torch.save `state` to `path` so that `path` is either absent or complete, never partial.

    The bytes go to a temporary file in `scratch_dir` (same file system; not the checkpoint folder, whose every
    file nerfstudio's ns-eval and ns-viewer take for a checkpoint), are flushed to disk, then renamed into place.
    """
    import tempfile

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=scratch_dir)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
