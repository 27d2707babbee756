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
- **Resume in place.** `--load-dir RUN/nerfstudio_models` continues RUN itself (`stages/resume.py` points the
  run folder there before ns-train writes anything): its checkpoints, metrics.csv and train_log.csv go on, and
  the log rows of steps after the loaded checkpoint (the part of the run a kill lost, trained again now) are
  dropped so the history reads as one run.
- **Every run ends with its full evaluation**, once: nerfstudio evaluates all images only at multiples of
  `--steps-per-eval-all-images` and never with `--vis viewer`, and its last step is `max_num_iterations - 1`, so
  with the methods' defaults (equal numbers) no run was ever evaluated. Here the end of training saves the last
  checkpoint (unless that step is saved already) and evaluates every eval view (a metrics.csv row; stage 2: the
  reference/edit pairs) unless metrics.csv already holds a row for that step.

Data-parallel runs (several processes, stages/base_pipeline.py): every rank takes part in a save (its torch
generators are gathered into the checkpoint) and rank 0 writes it; a resume on as many ranks gives each its own
generators back, on another number of ranks the samplers' one shared state still continues the run. Evaluation
batches and single eval images are computed once, by rank 0; full evaluations are split across the ranks. A
distributed run ends when training ends (rank 0 does not stay on with the viewer).

On a CPU, each training step runs under the adaptive thread policy (`thread_policy.py`, `--cpu-threads adaptive`,
the default), which keeps the thread setting that trains fastest on the machine as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils import writer
from nerfstudio.utils.decorators import check_eval_enabled
from nerfstudio.utils.misc import step_check
from nerfstudio.utils.rich_utils import CONSOLE

from gridinr_nerfstudio import distributed
from gridinr_nerfstudio.eval import eval_log, train_log
from gridinr_nerfstudio.runs import list_checkpoints, read_newest_checkpoint, save_checkpoint_atomically
from gridinr_nerfstudio.stages.base_pipeline import StagePipeline
from gridinr_nerfstudio.thread_policy import AdaptiveThreads


def torch_generators() -> Dict[str, Any]:
    """This process's torch generators (the CPU one and, with CUDA, every device's)."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_torch_generators(state: Dict[str, Any]) -> None:
    """Inverse of `torch_generators` (parts a checkpoint lacks are left as they are)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def random_state(pipeline: StagePipeline) -> Dict[str, Any]:
    """Generators a training step draws from: torch's (rank 0's at the top, every rank's under "ranks" when
    distributed) and the data manager's samplers (one state, the same on every rank). A collective: every rank
    calls it."""
    generators = torch_generators()
    state: Dict[str, Any] = dict(generators)
    if distributed.world_size() > 1:
        state["ranks"] = distributed.all_gather_objects(generators)
    state["datamanager"] = pipeline.datamanager.get_sampler_state()
    return state


def restore_random_state(pipeline: StagePipeline, state: Dict[str, Any]) -> None:
    """Inverse of `random_state`: each rank takes its own generators when the run had as many ranks (else rank 0's
    go to rank 0 and the others keep their seeds); the samplers continue from the one saved state."""
    ranks = state.get("ranks")
    if ranks is not None and len(ranks) == distributed.world_size():
        restore_torch_generators(ranks[distributed.rank()])
    elif distributed.is_main():
        restore_torch_generators(state)
    if "datamanager" in state:
        pipeline.datamanager.set_sampler_state(state["datamanager"])


class GridINRTrainer(Trainer):
    """nerfstudio's Trainer with atomic checkpoints, a resume that continues its run to the same end, and a full
    evaluation at the end of every run."""

    saved_step: Optional[int] = None
    """Step of the checkpoint in this run's folder that holds the current state (not saved again)."""

    pipeline: StagePipeline

    def __init__(self, config: TrainerConfig, local_rank: int = 0, world_size: int = 1) -> None:
        if world_size > 1:  # rank 0 waiting in the viewer after training would keep every rank (and torchrun) up
            config.viewer.quit_on_train_completion = True
        super().__init__(config, local_rank=local_rank, world_size=world_size)

    cpu_threads: AdaptiveThreads | None = None
    """The thread policy of the training steps (a CPU run with `cpu_threads` "adaptive"), else None."""

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
        if path.parent.resolve() == self.checkpoint_dir.resolve():  # resumed in place
            self.saved_step = int(state["step"])
            self.drop_log_rows_after(self.saved_step)
        remaining = max(0, self.config.max_num_iterations - self._start_step)
        CONSOLE.print(f"Done loading Nerfstudio checkpoint from {path}: continuing at step {self._start_step} "
                      f"of {self.config.max_num_iterations} ({remaining} steps left)")

    def drop_log_rows_after(self, step: int) -> None:
        """A run resumed in place trains the steps after its checkpoint again: their old log rows go."""
        dropped = eval_log.drop_rows_after(self.base_dir / "metrics.csv", step)
        dropped += train_log.drop_rows_after(self.base_dir / "train_log.csv", step)
        if dropped:
            CONSOLE.print(f"Dropped {dropped} log rows of steps after {step} from {self.base_dir} (metrics.csv, "
                          "train_log.csv): the part of the run that was lost after that checkpoint, trained again now",
                          soft_wrap=True, markup=False)

    def train(self) -> None:
        """nerfstudio's loop, run from the loaded step to `max_num_iterations` in all (not that many more)."""
        total = self.config.max_num_iterations
        if self._start_step >= total:
            CONSOLE.print(f"The loaded checkpoint already completed all {total} steps: nothing left to train (the run "
                          "is evaluated only if its metrics.csv lacks its last step)", soft_wrap=True)
            self.step = self._start_step - 1
        self.config.max_num_iterations = max(0, total - self._start_step)  # nerfstudio runs range(start, start + this)
        # One process only: the ranks of a data-parallel run wait for each other in every all-reduce, so a rank's
        # step time says little about its own threads (they keep distributed.py's share of the cores).
        if self.config.cpu_threads == "adaptive" and self.device.split(":")[0] == "cpu" and self.world_size == 1:
            self.cpu_threads = AdaptiveThreads()
        try:
            super().train()
        finally:
            self.config.max_num_iterations = total
        if self.cpu_threads is not None and self.cpu_threads.controller.rounds > 0:
            summary = self.cpu_threads.summary()
            CONSOLE.print(f"CPU threads (adaptive): steps per setting {summary['steps_at']}, "
                          f"{summary['rounds']} measurements, ended on {summary['current']}")

    def train_iteration(self, step: int):
        """nerfstudio's step, timed by the thread policy that also picks its thread setting (CPU runs)."""
        if self.cpu_threads is None:
            return super().train_iteration(step)
        with self.cpu_threads.step():
            return super().train_iteration(step)

    @check_eval_enabled
    def eval_iteration(self, step: int) -> None:
        """nerfstudio's evaluations; with several ranks, the evaluation batch and the single eval image on rank 0
        alone, and the full evaluation (which splits its views across the ranks) on every rank."""
        if distributed.is_main():
            super().eval_iteration(step)
        elif step_check(step, self.config.steps_per_eval_all_images):
            self.pipeline.get_average_eval_image_metrics(step=step)

    def _after_train(self) -> None:
        """The last checkpoint, then the full evaluation, then nerfstudio's end (banner, callbacks, viewer)."""
        self.save_checkpoint(self.step)
        self.evaluate_at_end()
        super()._after_train()  # its own save of this step is skipped: saved just now

    def evaluate_at_end(self) -> None:
        """Evaluate every eval view at the last step, unless metrics.csv holds that step already (an evaluation
        during training at the same step, or a completed run resumed again), whatever `--vis` is. With several
        ranks rank 0 decides and every rank takes its share of the views."""
        if not self.config.final_evaluation or not self.pipeline.datamanager.eval_dataset:
            return
        done = distributed.is_main() and eval_log.has_row_for_step(self.base_dir / "metrics.csv", self.step)
        if distributed.world_size() > 1:
            done = distributed.broadcast_object(done)
        if done:
            return
        with self.train_lock:
            metrics = self.pipeline.get_average_eval_image_metrics(step=self.step)
        if distributed.is_main():
            writer.put_dict(name="Eval Images Metrics Dict (all images)", scalar_dict=metrics, step=self.step)
            writer.write_out_storage()

    def save_checkpoint(self, step: int) -> None:
        """Write `step-N.ckpt` atomically; older checkpoints are deleted (when latest-only) once it is complete.

        Every rank calls this (their generators are gathered); rank 0 writes. A step saved already (the last step
        when `--steps-per-save` divides it, a completed run resumed) is not written twice."""
        path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        if self.saved_step == step and path.is_file():
            return
        generators = random_state(self.pipeline)
        self.saved_step = step
        if not distributed.is_main():
            return
        state = {
            "step": step,
            "pipeline": self.pipeline.state_dict(),  # the keys of a single-process run, also when distributed
            "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
            "random_state": generators,
        }
        save_checkpoint_atomically(state, path, scratch_dir=self.base_dir)
        if self.config.save_only_latest_checkpoint:
            for _, older in list_checkpoints(self.checkpoint_dir):
                if older != path:
                    older.unlink(missing_ok=True)
        for stale in self.base_dir.glob(".step-*.ckpt.*.partial"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
