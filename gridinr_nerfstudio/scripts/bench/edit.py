"""``gridinr-bench edit``: seconds per stage-2 step of the default and the fast profile vs the CLIP floor.

Contenders, on one stage-1 run and one CLIP model (loaded once, shared):

- ``default``: a training step of ``gridinr-edit`` (render, CLIP loss, pixel loss, backward, Adam step);
- ``fast``: a training step of ``gridinr-edit-fast`` (smaller render, one crop, directional loss);
- ``clip_floor``: the CLIP loss of the default profile alone on fixed images of the rendered size
  (crops, forward, backward to the images): what a step costs with free rendering. ``fast.clip_floor`` is
  the same for the fast profile.

Steps alternate between the contenders (after one untimed warm-up step each), so load from other
processes hits all of them alike. Each step is timed in wall seconds and in CPU seconds of the calling thread;
with one torch thread (the default) the latter holds all of the step's work and hardly depends on the load. ``fast.total_seconds`` estimates the whole ``gridinr-edit-fast`` run from
its measured setup, its steps, its intermediate renders and its final evaluation renders.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from nerfstudio.engine.optimizers import Optimizers

from gridinr_nerfstudio.runs import load_run_config
from gridinr_nerfstudio.stages.edit.clip_loss import load_clip
from gridinr_nerfstudio.stages.edit.pipeline import make_clip_loss

PROFILES = ("default", "fast")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "edit", help="s/step of the default and fast gridinr-edit profiles and of CLIP alone", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--load-config", type=Path, required=True,
                        help="config.yml of a gridinr-fit run (or of a gridinr-edit run: its stage-1 run is used)")
    parser.add_argument("--clip-model", default="ViT-B-16", help="open_clip model name")
    parser.add_argument("--clip-weights", type=Path, required=True,
                        help="local open_clip weights file (random weights give the real cost)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default; 1 is steadier on a shared 2-core machine, see gridinr-bench fit)")
    return parser


def profile_config(name: str):
    """The trainer config of a profile (imported here: gridinr_config pulls in all of nerfstudio's trainer)."""
    from gridinr_nerfstudio.gridinr_config import edit_fast_trainer_config, edit_trainer_config

    return {"default": edit_trainer_config, "fast": edit_fast_trainer_config}[name]()


def stage1_config_of(path: Path) -> Path:
    """The gridinr-fit config.yml behind `path` (itself, or the stage-1 run of a gridinr-edit run)."""
    config = load_run_config(path)
    method = getattr(config, "method_name", None)
    if method == "gridinr-fit":
        return path
    if method in ("gridinr-edit", "gridinr-edit-fast") and config.pipeline.stage1_config is not None:
        return Path(config.pipeline.stage1_config)
    raise ValueError(f"{path}: not a gridinr-fit or gridinr-edit run (method {method!r})")


class Contender:
    """A profile's pipeline and optimizers, built as ns-train builds them, with CLIP handed over."""

    def __init__(self, name: str, stage1: Path, clip, device: str):
        self.trainer = profile_config(name)
        config = self.trainer.pipeline
        config.stage1_config = stage1
        model_config = config.model
        lam_clip, model_config.lam_clip = model_config.lam_clip, 0.0  # no second copy of CLIP: ours is shared
        holder = {}
        self.setup_seconds = timed(lambda: holder.setdefault("pipeline", config.setup(device=device, test_mode="val")))
        self.pipeline = holder["pipeline"]
        self.pipeline.model.config.lam_clip = lam_clip
        self.pipeline.model.set_clip_loss(make_clip_loss(clip, self.pipeline.model.config))
        self.optimizers = Optimizers(self.trainer.optimizers, self.pipeline.get_param_groups())
        self.step_index = 0

    def step(self) -> None:
        self.optimizers.zero_grad_all()
        _, losses, _ = self.pipeline.get_train_loss_dict(self.step_index)
        sum(losses.values()).backward()
        self.optimizers.optimizer_step_all()
        self.step_index += 1

    def clip_floor_step(self) -> None:
        """The CLIP loss alone on fixed images of the training size: forward and backward to the images."""
        manager = self.pipeline.datamanager
        references = manager.train_images[: manager.config.views_per_step].to(self.pipeline.device)
        images = references.clone().requires_grad_(True)
        self.pipeline.model.clip_loss(images, reference_images=references).backward()


def timed(what) -> tuple[float, float]:
    """Wall seconds and CPU seconds of this thread (with one torch thread, all of the step's work) of `what()`."""
    wall, cpu = time.perf_counter(), time.thread_time()
    what()
    return time.perf_counter() - wall, time.thread_time() - cpu


def run(args: argparse.Namespace) -> dict:
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    stage1 = stage1_config_of(args.load_config)
    holder = {}
    clip_load_seconds = timed(lambda: holder.setdefault("clip", load_clip(args.clip_model, args.clip_weights, device=args.device)))
    clip = holder["clip"]
    contenders = {name: Contender(name, stage1, clip, args.device) for name in PROFILES}
    timings = {
        "default": contenders["default"].step,
        "fast": contenders["fast"].step,
        "clip_floor": contenders["default"].clip_floor_step,
        "fast_clip_floor": contenders["fast"].clip_floor_step,
    }
    seconds = {name: 0.0 for name in timings}
    cpu_seconds = {name: 0.0 for name in timings}
    for what in timings.values():  # warm-up: first-call allocations and lazy field-cache decoding
        what()
    for _ in range(args.steps):
        for name, what in timings.items():
            wall, cpu = timed(what)
            seconds[name] += wall
            cpu_seconds[name] += cpu
    per_step = {name: total / args.steps for name, total in seconds.items()}
    cpu_per_step = {name: total / args.steps for name, total in cpu_seconds.items()}

    fast = contenders["fast"]
    iterations = fast.trainer.max_num_iterations
    four_views = timed(lambda: fast.pipeline.render_eval_views(4))
    eval_views = len(fast.pipeline.datamanager.eval_dataset)
    intermediate = iterations // max(1, fast.pipeline.config.steps_per_render)
    # Final evaluation: every eval view rendered twice (nerfstudio's image metrics, then CLIP scores).
    parts = {clock: {"clip_load": clip_load_seconds[clock], "setup": fast.setup_seconds[clock],
                     "steps": iterations * (per_step, cpu_per_step)[clock]["fast"],
                     "intermediate_renders": intermediate * four_views[clock],
                     "final_eval_renders": 2.0 * four_views[clock] / 4.0 * eval_views} for clock in (0, 1)}
    total, total_cpu = sum(parts[0].values()), sum(parts[1].values())
    results = {
        "default": {"seconds_per_iteration": per_step["default"],
                    "cpu_seconds_per_iteration": cpu_per_step["default"],
                    "x_clip_floor": per_step["default"] / per_step["clip_floor"],
                    "x_clip_floor_cpu": cpu_per_step["default"] / cpu_per_step["clip_floor"],
                    "iterations": contenders["default"].trainer.max_num_iterations},
        "fast": {"seconds_per_iteration": per_step["fast"], "iterations": iterations, "total_seconds": total,
                 "cpu_seconds_per_iteration": cpu_per_step["fast"],
                 "clip_floor": {"seconds_per_iteration": per_step["fast_clip_floor"],
                                "cpu_seconds_per_iteration": cpu_per_step["fast_clip_floor"]},
                 "x_clip_floor": per_step["fast"] / per_step["fast_clip_floor"],
                 "x_clip_floor_cpu": cpu_per_step["fast"] / cpu_per_step["fast_clip_floor"],
                 "total_cpu_seconds": total_cpu, "total_parts": parts[0], "total_parts_cpu": parts[1]},
        "clip_floor": {"seconds_per_iteration": per_step["clip_floor"], "cpu_seconds_per_iteration": cpu_per_step["clip_floor"]},
        "config": {"clip_model": args.clip_model, "steps": args.steps, "threads": torch.get_num_threads(),
                   "device": args.device, "stage1_config": str(stage1)},
    }
    print_table(results)
    return results


def print_table(results: dict) -> None:
    config = results["config"]
    print(f"CLIP {config['clip_model']}, {config['steps']} timed steps per contender (alternated), "
          f"torch threads {config['threads']}, device {config['device']}")
    print(f"{'contender':<22}{'s/step':>10}{'x CLIP floor':>14}{'CPU s/step':>12}{'x floor (CPU)':>15}")
    default, fast = results["default"], results["fast"]
    rows = [("default", default, default["x_clip_floor"], default["x_clip_floor_cpu"]),
            ("clip_floor (default)", results["clip_floor"], 1.0, 1.0),
            ("fast", fast, fast["x_clip_floor"], fast["x_clip_floor_cpu"]),
            ("clip_floor (fast)", fast["clip_floor"], 1.0, 1.0)]
    for name, row, ratio, cpu_ratio in rows:
        print(f"{name:<22}{row['seconds_per_iteration']:>10.3f}{ratio:>14.2f}"
              f"{row['cpu_seconds_per_iteration']:>12.3f}{cpu_ratio:>15.2f}")
    fast = results["fast"]
    parts = ", ".join(f"{key} {value:.1f} s" for key, value in fast["total_parts"].items())
    print(f"fast profile, {fast['iterations']} iterations: about {fast['total_seconds']:.0f} s in all ({parts}); "
          f"CPU seconds of the main thread {fast['total_cpu_seconds']:.0f}")
