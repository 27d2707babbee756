"""nerfstudio's Trainer with checkpoints that survive a kill and a resume that continues the same run.

Three changes to nerfstudio 1.1.5's `Trainer`, each for a failure seen on real runs:

- **Atomic saves.** nerfstudio writes `step-N.ckpt` in place and then deletes the older ones: a kill during the
  save leaves a truncated newest file that every reader picks, and the next save deletes the good one. Here the
  bytes go to a temporary file in the run folder and are renamed into place when complete; older checkpoints are
  deleted only after that (`runs.save_checkpoint_atomically`).
- **Resume loads the newest checkpoint that loads** (`runs.read_newest_checkpoint`: stray files such as
  .DS_Store and truncated files are skipped), with `weights_only=True`.
- **Resume continues the run.** nerfstudio trains `max_num_iterations` more steps after the loaded one
  (`--load-dir` with the same command ran 150%), and the schedules, which follow `max_num_iterations`, then jump.
  Here `max_num_iterations` is the run's total: a resumed run stops at the same last step as an uninterrupted
  one. Checkpoints also carry the random state (torch's generators and the data manager's samplers), so a run
  killed after a checkpoint and resumed trains on the same batches as one that was never stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
from nerfstudio.engine.trainer import Trainer
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.utils.rich_utils import CONSOLE

from gridinr_nerfstudio.runs import list_checkpoints, read_newest_checkpoint, save_checkpoint_atomically


def random_state(pipeline) -> Dict[str, Any]:
    """Generators a training step draws from: torch's global ones and the data manager's own samplers."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    get_state = getattr(pipeline.datamanager, "get_sampler_state", None)
    if callable(get_state):
        state["datamanager"] = get_state()
    return state


def restore_random_state(pipeline, state: Dict[str, Any]) -> None:
    """Inverse of `random_state` (parts a checkpoint lacks are left as they are)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    set_state = getattr(pipeline.datamanager, "set_sampler_state", None)
    if "datamanager" in state and callable(set_state):
        set_state(state["datamanager"])


class GridINRTrainer(Trainer):
    """nerfstudio's Trainer with atomic checkpoints and a resume that ends where the uninterrupted run ends."""

    def _load_checkpoint(self) -> None:
        load_dir, load_checkpoint = self.config.load_dir, self.config.load_checkpoint
        if load_dir is None and load_checkpoint is None:
            CONSOLE.print("No Nerfstudio checkpoint to load, so training from scratch.")
            return
        if load_dir is not None and self.config.load_step is None:
            path, _, state = read_newest_checkpoint(Path(load_dir))
        else:
            path = Path(load_checkpoint) if load_dir is None else Path(load_dir) / f"step-{self.config.load_step:09d}.ckpt"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: checkpoint not found")
            state = torch.load(path, map_location="cpu", weights_only=True)
        self._start_step = int(state["step"]) + 1
        self.pipeline.load_pipeline(state["pipeline"], state["step"])
        self.optimizers.load_optimizers(state["optimizers"])
        if "schedulers" in state and self.config.load_scheduler:
            self.optimizers.load_schedulers(state["schedulers"])
        self.grad_scaler.load_state_dict(state["scalers"])
        if "random_state" in state:
            restore_random_state(self.pipeline, state["random_state"])
        remaining = max(0, self.config.max_num_iterations - self._start_step)
        CONSOLE.print(f"Done loading Nerfstudio checkpoint from {path}: continuing at step {self._start_step} "
                      f"of {self.config.max_num_iterations} ({remaining} steps left)")

    def train(self) -> None:
        """nerfstudio's loop, run from the loaded step to `max_num_iterations` in all (not that many more)."""
        total = self.config.max_num_iterations
        if self._start_step >= total:
            CONSOLE.print(f"The loaded checkpoint already completed all {total} steps: nothing left to train")
            self.step = self._start_step - 1
        self.config.max_num_iterations = max(0, total - self._start_step)  # nerfstudio runs range(start, start + this)
        try:
            super().train()
        finally:
            self.config.max_num_iterations = total

    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        """Write `step-N.ckpt` atomically; older checkpoints are deleted (when latest-only) once it is complete."""
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline
        state = {
            "step": step,
            "pipeline": pipeline.state_dict(),
            "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
            "random_state": random_state(self.pipeline),
        }
        path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        save_checkpoint_atomically(state, path, scratch_dir=self.base_dir)
        if self.config.save_only_latest_checkpoint:
            for _, older in list_checkpoints(self.checkpoint_dir):
                if older != path:
                    older.unlink(missing_ok=True)
        for stale in self.base_dir.glob(".step-*.ckpt.*.partial"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
