"""Where a resumed run continues, and with which settings.

`ns-train METHOD --load-dir RUN/nerfstudio_models` (or `--load-checkpoint RUN/nerfstudio_models/step-N.ckpt`)
continues RUN itself: before ns-train prints or writes anything, the run folder is pointed at RUN (its
`--output-dir`, `--experiment-name` and `--timestamp`; others given on the command line do not apply), so
checkpoints, metrics.csv, train_log.csv and renders go on in one folder (`GridINRTrainer` drops the log rows of
steps after the loaded checkpoint: the part a kill lost, trained again). The run's settings come from
RUN/config.yml: an option left at the method's default takes the run's value; options that say how the run goes
on (`Entry.resume == "change"` in `stages/option_table.py`: length, checkpoints, evaluations, loggers, viewer,
device) may differ, are listed in one line, and the run's earlier config.yml is kept as
`config.until-step-N.yml`; any other difference (field sizes, volume, losses, ...) is refused in one line, since
the checkpoint belongs to the run's settings. A checkpoint older than the run's newest is refused too (resuming
in place from it would overwrite the later history).

When the checkpoint's folder is not inside a run folder of this method (`OUTPUT/EXPERIMENT/METHOD/TIMESTAMP` with
a config.yml), the continuation goes to a new run folder, as for a new run, and one line says so.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from nerfstudio.utils.rich_utils import CONSOLE

from gridinr_nerfstudio.runs import list_checkpoints, load_run_config, read_checkpoint, read_newest_checkpoint
from gridinr_nerfstudio.stages.option_table import OPTION_TABLE, SWITCHES_THAT_MAY_CHANGE
from gridinr_nerfstudio.stages.options import MISSING, get_option, iter_options, set_option, table_entry

LOCATION = ("output_dir", "experiment_name", "timestamp")
"""Options that place the run folder: a run resumed in place keeps its own."""
RESUME_OPTIONS = ("load_dir", "load_step", "load_checkpoint", "load_config")
"""The resume's own options: not settings of the run."""


class ResumeError(ValueError):
    """A resume that cannot continue its run; the message is one line."""


@dataclass
class ResumePlan:
    """What `--load-dir` / `--load-checkpoint` will do."""

    checkpoint: Path
    step: int
    run_dir: Optional[Path]
    """The run folder holding the checkpoint, when it has a config.yml of this method."""
    in_place: bool
    changes: List[str] = field(default_factory=list)
    """`--flag old -> new` for each option that differs from the run's config.yml."""


def _checkpoint_to_load(config) -> Path:
    """The file the trainer will load: `--load-checkpoint`, `--load-dir` + `--load-step`, or the newest that loads."""
    if config.load_dir is None:
        path = Path(config.load_checkpoint)
        if not path.is_file():
            raise ResumeError(f"--load-checkpoint {path}: checkpoint not found")
        return path
    folder = Path(config.load_dir)
    if not folder.is_dir():
        raise ResumeError(f"--load-dir {folder}: no such folder (pass RUN/nerfstudio_models of a run)")
    if config.load_step is not None:
        path = folder / f"step-{config.load_step:09d}.ckpt"
        if not path.is_file():
            steps = ", ".join(str(step) for step, _ in list_checkpoints(folder)) or "none"
            raise ResumeError(f"--load-step {config.load_step}: no {path.name} in {folder} (steps there: {steps})")
        return path
    if not list_checkpoints(folder) and list_checkpoints(folder / config.relative_model_dir):
        raise ResumeError(f"--load-dir {folder}: the checkpoints are in {folder / config.relative_model_dir}")
    try:
        return read_newest_checkpoint(folder, mmap=True, report=None)[0]
    except FileNotFoundError as error:
        raise ResumeError(f"--load-dir {error}") from None


def _same(left: Any, right: Any) -> bool:
    if isinstance(left, Path) or isinstance(right, Path):
        if left is None or right is None:
            return left is right
        return Path(left) == Path(right) or Path(left).resolve() == Path(right).resolve()
    try:
        return bool(left == right)
    except Exception:
        return False


def _policy(path: str) -> str:
    entry = table_entry(OPTION_TABLE, path)
    if entry is not None:
        return entry.resume
    return "change" if path in SWITCHES_THAT_MAY_CHANGE else "keep"


def adopt_run_settings(config, saved, defaults, run_dir: Path, in_place: bool) -> List[str]:
    """Give `config` the run's settings where the command line left the method's default (see the module doc);
    returns the allowed changes, raises ResumeError listing the refused ones."""
    changes, refused = [], []
    for option in iter_options(config):
        if option.path in LOCATION or option.path in RESUME_OPTIONS:
            continue
        try:
            old = get_option(saved, option.path)
        except (AttributeError, KeyError, TypeError):
            continue  # an option the run's config predates: the method's default applies
        policy = _policy(option.path)
        if policy == "derived":
            if option.path == "pipeline.model.stage1_checkpoint" and old is not None and not in_place:
                old = run_dir / old if not Path(old).is_absolute() else old  # the edit run's own copy of the field
            set_option(config, option.path, old)
            continue
        if _same(option.value, old):
            continue
        try:
            default = get_option(defaults, option.path)
        except (AttributeError, KeyError, TypeError):
            default = MISSING
        if default is not MISSING and _same(option.value, default):
            set_option(config, option.path, old)  # not given on the command line: the run's value
        elif policy == "change":
            changes.append(f"{option.flag} {old!r} -> {option.value!r}")
        else:
            refused.append(f"{option.flag} {option.value!r} (the run has {old!r})")
    if refused:
        raise ResumeError(
            f"--load-dir: resuming {run_dir} keeps the settings its checkpoint was trained with, and these differ: "
            f"{'; '.join(refused)}. Leave them out to continue the run, or start a new run without --load-dir")
    return changes


def plan_resume(config, defaults) -> Optional[ResumePlan]:
    """Check a resume before anything is written and point `config` at the run it continues (None: no resume)."""
    if config.load_dir is None and config.load_checkpoint is None:
        return None
    checkpoint = _checkpoint_to_load(config)
    try:
        step = int(read_checkpoint(checkpoint, mmap=True).get("step", -1))
    except ValueError as error:
        raise ResumeError(str(error)) from None
    run_dir = checkpoint.parent.parent
    saved_path = run_dir / "config.yml"
    if not saved_path.is_file():
        return ResumePlan(checkpoint, step, None, in_place=False)
    saved = load_run_config(saved_path)  # RunConfigError: one line
    if saved.method_name != config.method_name:
        raise ResumeError(f"{saved_path}: a {saved.method_name} run; resume it with ns-train {saved.method_name}")
    in_place = (run_dir.resolve().parent.name == config.method_name
                and checkpoint.parent.name == Path(config.relative_model_dir).name)
    if in_place:
        newest = read_newest_checkpoint(checkpoint.parent, mmap=True, report=None)[0]
        if newest.resolve() != checkpoint.resolve():
            raise ResumeError(
                f"{checkpoint}: {run_dir} has a newer checkpoint ({newest.name}); resuming in place from an older one "
                "would overwrite the run's later history: resume from the newest (--load-dir without --load-step), "
                "or copy the run folder and resume the copy")
    changes = adopt_run_settings(config, saved, defaults, run_dir, in_place)
    if in_place:
        folder = run_dir if len(run_dir.parts) >= 4 else run_dir.resolve()
        config.output_dir, config.experiment_name, config.timestamp = folder.parent.parent.parent, folder.parent.parent.name, folder.name
    return ResumePlan(checkpoint, step, run_dir, in_place, changes)


def announce_resume(config, plan: ResumePlan) -> None:
    """Say in one line where the continuation goes (and what changed); keep the run's earlier config.yml when
    the continuation changes it."""
    where = config.get_base_dir()
    changed = f"; changed: {', '.join(plan.changes)}" if plan.changes else ""
    if plan.in_place:
        kept = ""
        if plan.changes:
            previous = where / f"config.until-step-{plan.step}.yml"
            shutil.copyfile(where / "config.yml", previous)
            kept = f" (its earlier config.yml kept as {previous.name})"
        CONSOLE.print(f"Resuming {where} in place from {plan.checkpoint.name} (step {plan.step}): checkpoints, "
                      f"metrics.csv and train_log.csv continue there{changed}{kept}", soft_wrap=True, markup=False)
    else:
        why = (f"{plan.checkpoint.parent} is not inside a run folder with a config.yml" if plan.run_dir is None else
               f"{plan.run_dir} is not laid out as OUTPUT/EXPERIMENT/{config.method_name}/TIMESTAMP")
        CONSOLE.print(f"Continuing from {plan.checkpoint} (step {plan.step}) in a new run folder {where} ({why})"
                      f"{changed}", soft_wrap=True, markup=False)
