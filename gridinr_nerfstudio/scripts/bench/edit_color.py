"""The colour-target part of ``gridinr-bench edit``: how fast a colour target recolours its part, without CLIP.

A ``gridinr-edit`` pipeline with the default settings and one colour target (a palette image, by default the
shipped "ocean" palette, on a value range) trains for ``seconds`` of training time (the steps alone: evaluations
are not counted). Every ``eval_every`` steps the first ``views`` eval views are rendered without autograd:

- the colour distance of the target (sliced W2 between the part's rendered colours, weighted by accumulation, and
  the palette's colours; `ColorLoss.distance`), whose ratio to its value at step 0 is the figure;
- the PSNR of the whole views' accumulation (opacity) maps against those of the unedited transfer function:
  how much of what is visible the edit changed (infinite when it changed nothing).

Variants: ``colour_only`` (the default of colour targets: the part's opacity is not trainable) and
``with_opacity`` (the target may also change opacity, `"opacity": true`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from nerfstudio.engine.optimizers import Optimizers

VARIANTS = ("colour_only", "with_opacity")


def color_run(stage1: Path, device: str, seconds: float, value_range: tuple[float, float], palette: str,
              eval_every: int, views: int, with_opacity: bool) -> dict:
    """Train one colour target for `seconds` of step time; the distance and accumulation PSNR along the way."""
    from gridinr_nerfstudio.gridinr_config import edit_trainer_config
    from gridinr_nerfstudio.stages.edit.targets import EditTarget

    trainer = edit_trainer_config()
    pipeline_config = trainer.pipeline
    pipeline_config.stage1_config = stage1
    model_config = pipeline_config.model
    model_config.lam_clip = 0.0  # no command-line prompt target: only the colour target below
    pipeline = pipeline_config.setup(device=device, test_mode="val")
    model = pipeline.model
    from gridinr_nerfstudio.stages.edit.color_loss import resolve_palette

    target = EditTarget(low=value_range[0], high=value_range[1], palette=resolve_palette(palette),
                        edit_opacity=with_opacity)
    model.set_target(0, target)
    optimizers = Optimizers(trainer.optimizers, pipeline.get_param_groups())
    cameras = pipeline.datamanager.eval_dataset.cameras[torch.arange(views)].to(device)

    def evaluate() -> tuple[torch.Tensor, float]:
        model.eval()
        with torch.no_grad():
            accumulation = model.render_view_outputs(cameras, model.color_fn())["accumulation"]
        distance = model.target_eval_metrics(cameras, []).get("target1_color_distance", math.nan)  # nan: not shown
        model.train()
        return accumulation, distance

    start_accumulation, start_distance = evaluate()
    trace = [{"step": 0, "seconds": 0.0, "distance": start_distance, "ratio": 1.0, "accumulation_psnr": math.inf}]
    trained, step = 0.0, 0
    while trained < seconds:
        started = time.perf_counter()
        optimizers.zero_grad_all()
        _, losses, _ = pipeline.get_train_loss_dict(step)
        sum(losses.values()).backward()
        optimizers.optimizer_step_all()
        trained += time.perf_counter() - started
        step += 1
        if step % eval_every == 0 or trained >= seconds:
            accumulation, distance = evaluate()
            mse = float((accumulation - start_accumulation).square().mean())
            trace.append({"step": step, "seconds": trained, "distance": distance, "ratio": distance / start_distance,
                          "accumulation_psnr": -10.0 * math.log10(mse) if mse > 0 else math.inf})
            print(f"  step {step:4d}  {trained:6.1f} s  distance {distance:.4f} ({distance / start_distance:.3f} of "
                  f"the start)  accumulation PSNR {trace[-1]['accumulation_psnr']:.1f} dB", flush=True)
    halved = next((row for row in trace if row["ratio"] <= 0.5), None)
    return {"start_distance": start_distance, "end_distance": trace[-1]["distance"], "end_ratio": trace[-1]["ratio"],
            "seconds": trained, "steps": step, "seconds_per_step": trained / max(step, 1),
            "halved_at_seconds": None if halved is None else halved["seconds"],
            "halved_at_step": None if halved is None else halved["step"],
            "min_accumulation_psnr": min(row["accumulation_psnr"] for row in trace),
            "range": list(value_range), "palette": palette, "with_opacity": with_opacity, "trace": trace}


def run_color_section(stage1: Path, args) -> dict:
    results = {}
    for variant in args.color_variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--color-variants: unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
        print(f"colour target, {variant}: palette {args.color_palette} on {args.color_range}, "
              f"{args.color_seconds:g} s of training", flush=True)
        results[variant] = color_run(stage1, args.device, args.color_seconds, tuple(args.color_range),
                                     args.color_palette, args.color_eval_every, args.color_views,
                                     with_opacity=variant == "with_opacity")
    print_color_table(results)
    return results


def print_color_table(results: dict) -> None:
    print(f"{'variant':<14}{'steps':>7}{'s/step':>8}{'start':>9}{'end':>9}{'end/start':>11}{'halved at':>12}"
          f"{'min acc PSNR':>14}")
    for name, row in results.items():
        halved = "never" if row["halved_at_seconds"] is None else f"{row['halved_at_seconds']:.0f} s"
        psnr = row["min_accumulation_psnr"]
        print(f"{name:<14}{row['steps']:>7}{row['seconds_per_step']:>8.2f}{row['start_distance']:>9.4f}"
              f"{row['end_distance']:>9.4f}{row['end_ratio']:>11.3f}{halved:>12}"
              f"{('inf' if math.isinf(psnr) else f'{psnr:.1f} dB'):>14}")
