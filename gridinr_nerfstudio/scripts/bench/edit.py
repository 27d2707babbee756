"""``gridinr-bench edit``: stage-2 step costs with CLIP, and how fast a colour target works without CLIP.

Sections (``--sections``; ``profiles`` and ``targets`` need ``--clip-weights``, random weights give the real cost):

- ``profiles``: seconds per step of the default and the fast profile against the CLIP floor, on one stage-1 run and
  one CLIP model (loaded once, shared). ``default``: a training step of ``gridinr-edit`` (render, CLIP loss, pixel
  loss, backward, Adam step); ``fast``: one of ``gridinr-edit-fast`` (smaller render, one crop, directional loss);
  ``clip_floor``: the CLIP loss of the default profile alone on fixed images of the rendered size (crops, forward,
  backward to the images): what a step costs with free rendering. ``fast.clip_floor`` is the same for the fast
  profile. ``fast.total_seconds`` estimates the whole ``gridinr-edit-fast`` run from its measured setup, steps,
  intermediate renders and final evaluation renders.
- ``targets``: edits by parts, a default-profile step with k = 1, 2, 4 prompt targets on disjoint value ranges
  (equal slices of [0.1, 1]). Each needs one more render (its part) and ``clip_crops`` more CLIP crops (all of a
  step's crops go through CLIP as one batch). Its floors, measured alike: ``render_floor`` (the same step with a
  plain loss on the part renders instead of CLIP: 1 + k renders, backward, Adam) and ``clip_floor`` (k x crops
  through CLIP alone on fixed images). ``x_floors`` = step / (render floor + CLIP floor): about 1 when k targets
  cost what their renders and crops cost, and no more.
- ``color`` (no CLIP; ``edit_color.py``): a colour target on the run's volume with the default settings, trained
  for ``--color-seconds``: its colour distance against its start, and the accumulation PSNR against the unedited
  transfer function.

Steps alternate between the contenders of a section (after one untimed warm-up step each), so load from other
processes hits all of them alike. Each step is timed in wall seconds and in CPU seconds of the calling thread;
with one torch thread (the default) the latter holds all of the step's work and hardly depends on the load.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from nerfstudio.engine.optimizers import Optimizers

from gridinr_nerfstudio.runs import load_run_config
from gridinr_nerfstudio.stages.edit.clip_loss import load_clip
from gridinr_nerfstudio.stages.edit.targets import EditTarget

PROFILES = ("default", "fast")
SECTIONS = ("profiles", "targets", "color")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "edit", help="stage-2 s/step with CLIP (profiles, 1/2/4 targets) and a colour target's convergence",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--load-config", type=Path, required=True,
                        help="config.yml of a gridinr-fit run (or of a gridinr-edit run: its stage-1 run is used)")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated of {', '.join(SECTIONS)} (default: all; without --clip-weights: color)")
    parser.add_argument("--clip-model", default="ViT-B-16", help="open_clip model name")
    parser.add_argument("--clip-weights", type=Path,
                        help="local open_clip weights file (random weights give the real cost); profiles and targets")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender")
    parser.add_argument("--targets", default="1,2,4", help="target counts of the targets section")
    parser.add_argument("--color-seconds", type=float, default=120.0, help="training seconds of each colour run")
    parser.add_argument("--color-range", type=float, nargs=2, default=(0.8, 1.0), metavar=("LOW", "HIGH"),
                        help="normalised value range of the colour target (default: the built-in volume's tubes)")
    parser.add_argument("--color-palette", default="ocean", help="palette image, or a shipped palette's name")
    parser.add_argument("--color-eval-every", type=int, default=10, help="steps between distance measurements")
    parser.add_argument("--color-views", type=int, default=4, help="eval views the distance is measured on")
    parser.add_argument("--color-variants", default="colour_only,with_opacity",
                        help="colour_only (the default of colour targets) and/or with_opacity")
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


def slices(count: int, low: float = 0.1, high: float = 1.0) -> List[tuple]:
    """`count` disjoint equal value ranges of [low, high] with a small gap between them."""
    width = (high - low) / count
    return [(low + index * width + (0.005 if index else 0.0), low + (index + 1) * width) for index in range(count)]


class Contender:
    """A profile's pipeline and optimizers, built as ns-train builds them, with the shared CLIP handed over and
    `targets` (default: the profile's one prompt target over all values) set as the viewer sets them."""

    def __init__(self, name: str, stage1: Path, clip, device: str, targets: Optional[List[EditTarget]] = None):
        self.trainer = profile_config(name)
        config = self.trainer.pipeline
        config.stage1_config = stage1
        model_config = config.model
        lam_clip, model_config.lam_clip = model_config.lam_clip, 0.0  # no second copy of CLIP: ours is shared
        holder = {}
        self.setup_seconds = timed(lambda: holder.setdefault("pipeline", config.setup(device=device, test_mode="val")))
        self.pipeline = holder["pipeline"]
        model = self.pipeline.model
        model.config.lam_clip = lam_clip
        model.set_clip(clip)
        for slot, target in enumerate(targets or [EditTarget(prompt=model.config.prompt)]):
            model.set_target(slot, target)
        self.optimizers = Optimizers(self.trainer.optimizers, self.pipeline.get_param_groups())
        self.step_index = 0

    def step(self) -> None:
        self.optimizers.zero_grad_all()
        _, losses, _ = self.pipeline.get_train_loss_dict(self.step_index)
        sum(losses.values()).backward()
        self.optimizers.optimizer_step_all()
        self.step_index += 1

    def render_floor_step(self) -> None:
        """The step's renders (whole view and every part) with a plain loss instead of CLIP: backward and Adam."""
        self.optimizers.zero_grad_all()
        cameras, batch = self.pipeline.datamanager.next_train(self.step_index)
        outputs = self.pipeline.model.get_view_outputs(cameras)
        loss = (outputs["rgb"] - batch["image"]).square().mean()
        for part in outputs.get("parts", {}).values():
            loss = loss + part["rgb"].mean()
        loss.backward()
        self.optimizers.optimizer_step_all()

    def clip_floor_step(self) -> None:
        """Every CLIP target's crops through CLIP as one batch on fixed images of the training size: forward and
        backward to the images."""
        manager = self.pipeline.datamanager
        references = manager.train_images[: manager.config.views_per_step].to(self.pipeline.device)
        images = references.clone().requires_grad_(True)
        scored = [item.clip_loss for item in self.pipeline.model.scored.values() if item.clip_loss is not None]
        crops = [loss.crops(images, references) for loss in scored]
        clip = scored[0].clip
        embeddings = clip.encode_images(torch.cat([edit for edit, _ in crops])).split([len(e) for e, _ in crops])
        references_embedded = [None] * len(scored)
        if scored[0].directional:
            with torch.no_grad():
                encoded = clip.encode_images(torch.cat([ref for _, ref in crops]))
            references_embedded = list(encoded.split([len(r) for _, r in crops]))
        sum(loss.loss_from_embeddings(e, r) for loss, e, r in zip(scored, embeddings, references_embedded)).backward()


def timed(what) -> tuple[float, float]:
    """Wall seconds and CPU seconds of this thread (with one torch thread, all of the step's work) of `what()`."""
    wall, cpu = time.perf_counter(), time.thread_time()
    what()
    return time.perf_counter() - wall, time.thread_time() - cpu


def alternate(timings: Dict[str, Callable[[], None]], steps: int) -> tuple[Dict[str, float], Dict[str, float]]:
    """Wall and CPU seconds per step of each contender: one untimed warm-up each, then `steps` rounds."""
    for what in timings.values():  # warm-up: first-call allocations and lazy field-cache decoding
        what()
    seconds = {name: 0.0 for name in timings}
    cpu_seconds = {name: 0.0 for name in timings}
    for _ in range(steps):
        for name, what in timings.items():
            wall, cpu = timed(what)
            seconds[name] += wall
            cpu_seconds[name] += cpu
    return ({name: total / steps for name, total in seconds.items()},
            {name: total / steps for name, total in cpu_seconds.items()})


def run(args: argparse.Namespace) -> dict:
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    sections = args.sections.split(",") if args.sections else (list(SECTIONS) if args.clip_weights else ["color"])
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--sections: unknown {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    if {"profiles", "targets"} & set(sections) and args.clip_weights is None:
        raise SystemExit("--sections profiles and targets need --clip-weights (random weights give the real cost)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    stage1 = stage1_config_of(args.load_config)
    results: dict = {"config": {"clip_model": args.clip_model, "steps": args.steps, "threads": torch.get_num_threads(),
                                "device": args.device, "stage1_config": str(stage1), "sections": sections}}
    if "profiles" in sections or "targets" in sections:
        holder = {}
        clip_load_seconds = timed(lambda: holder.setdefault(
            "clip", load_clip(args.clip_model, args.clip_weights, device=args.device)))
        if "profiles" in sections:
            results.update(run_profiles(args, stage1, holder["clip"], clip_load_seconds))
        if "targets" in sections:
            results["targets"] = run_targets(args, stage1, holder["clip"])
    if "color" in sections:
        from gridinr_nerfstudio.scripts.bench.edit_color import run_color_section

        results["color"] = run_color_section(stage1, args)
    return results


def run_profiles(args: argparse.Namespace, stage1: Path, clip, clip_load_seconds) -> dict:
    contenders = {name: Contender(name, stage1, clip, args.device) for name in PROFILES}
    per_step, cpu_per_step = alternate({
        "default": contenders["default"].step,
        "fast": contenders["fast"].step,
        "clip_floor": contenders["default"].clip_floor_step,
        "fast_clip_floor": contenders["fast"].clip_floor_step,
    }, args.steps)
    fast = contenders["fast"]
    iterations = fast.trainer.max_num_iterations
    four_views = timed(lambda: fast.pipeline.render_eval_views(4))
    eval_views = len(fast.pipeline.datamanager.eval_dataset)
    intermediate = iterations // max(1, fast.pipeline.config.steps_per_render)
    # Final evaluation: every eval view rendered twice (nerfstudio's image metrics, then the targets' scores).
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
    }
    print_table(results, args)
    return results


def run_targets(args: argparse.Namespace, stage1: Path, clip) -> dict:
    """Steps with k prompt targets on disjoint ranges against their render and CLIP floors."""
    counts = [int(count) for count in args.targets.split(",")]
    prompts = ["a glowing orange molecule", "a deep blue ocean", "green glass", "white smoke"]
    contenders = {count: Contender("default", stage1, clip, args.device,
                                   [EditTarget(low=low, high=high, prompt=prompts[index % len(prompts)])
                                    for index, (low, high) in enumerate(slices(count))]) for count in counts}
    timings = {}
    for count, contender in contenders.items():
        timings.update({f"{count}": contender.step, f"{count}.render_floor": contender.render_floor_step,
                        f"{count}.clip_floor": contender.clip_floor_step})
    per_step, cpu_per_step = alternate(timings, args.steps)
    crops = contenders[counts[0]].pipeline.model.config.clip_crops
    results = {}
    for count in counts:
        floors = per_step[f"{count}.render_floor"] + per_step[f"{count}.clip_floor"]
        cpu_floors = cpu_per_step[f"{count}.render_floor"] + cpu_per_step[f"{count}.clip_floor"]
        results[str(count)] = {
            "renders": 1 + count, "clip_crops": count * crops,
            "seconds_per_iteration": per_step[f"{count}"], "cpu_seconds_per_iteration": cpu_per_step[f"{count}"],
            "render_floor": per_step[f"{count}.render_floor"], "clip_floor": per_step[f"{count}.clip_floor"],
            "x_floors": per_step[f"{count}"] / floors, "x_floors_cpu": cpu_per_step[f"{count}"] / cpu_floors,
        }
    print(f"edits by parts: default profile, k prompt targets on disjoint ranges of [0.1, 1] ({crops} crops each)")
    print(f"{'targets':<9}{'renders':>8}{'crops':>7}{'s/step':>9}{'render floor':>14}{'CLIP floor':>12}"
          f"{'x floors':>10}{'x floors (CPU)':>16}")
    for count, row in results.items():
        print(f"{count:<9}{row['renders']:>8}{row['clip_crops']:>7}{row['seconds_per_iteration']:>9.3f}"
              f"{row['render_floor']:>14.3f}{row['clip_floor']:>12.3f}{row['x_floors']:>10.2f}{row['x_floors_cpu']:>16.2f}")
    return results


def print_table(results: dict, args: argparse.Namespace) -> None:
    print(f"CLIP {args.clip_model}, {args.steps} timed steps per contender (alternated), "
          f"torch threads {torch.get_num_threads()}, device {args.device}")
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
