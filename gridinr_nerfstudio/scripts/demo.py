"""The main job (`make demo`): stage 1 then stage 2 on the built-in volume, evaluated, with a report.

Runs the real command-line tools one after another, exactly as a user would type them:

1. `ns-train gridinr-fit` on the built-in volume, then `ns-eval` (volume PSNR, PSNR/SSIM/LPIPS, speed);
2. `ns-train gridinr-edit` on that run: with the CLIP term when CLIP weights are in the cache, otherwise
   pixel loss only (a note says so), then `ns-eval`;
3. `gridinr-render orbit` (a short video) and `gridinr-report` (plots and a before/after figure).

Everything lands in OUTPUT_DIR; `summary.json` lists the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gridinr_nerfstudio.gridinr_config import FIT_ITERATIONS
from gridinr_nerfstudio.stages.edit.clip_loss import ClipWeightsUnavailable, resolve_clip_weights


def run(command: list[str], log: Path) -> None:
    """Run one CLI step, its output appended to `log`; stop the demo with the log's tail if it fails."""
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    with log.open("a") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    if result.returncode != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise SystemExit(f"demo: step failed (exit {result.returncode}): {' '.join(command)}; full log in {log}")


def tool(name: str) -> str:
    """Path of a console script installed next to this Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def clip_available(model: str, pretrained: str) -> bool:
    try:
        resolve_clip_weights(model, pretrained)
        return True
    except ClipWeightsUnavailable as error:
        print(f"note: {error}\nnote: stage 2 runs with the pixel loss only (--pipeline.model.lam-clip 0).", flush=True)
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output"))
    parser.add_argument("--data", default="builtin-default", help="volume to use (default: the built-in volume)")
    parser.add_argument("--fit-iterations", type=int, default=FIT_ITERATIONS, help="stage-1 iterations (gridinr-fit's default)")
    parser.add_argument("--edit-iterations", type=int, default=60)
    parser.add_argument("--prompt", default="a glowing orange molecule")
    args = parser.parse_args(argv)

    out = args.output_dir.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log = out / "demo.log"
    runs = out / "runs"
    common = ["--vis", "tensorboard", "--output-dir", str(runs), "--viewer.quit-on-train-completion", "True"]

    run([tool("ns-train"), "gridinr-fit", *common, "--timestamp", "fit", "--max-num-iterations", str(args.fit_iterations),
         "--pipeline.datamanager.dataparser.data", args.data], log)
    fit_config = next(runs.glob("*/gridinr-fit/fit/config.yml"))
    run([tool("ns-eval"), "--load-config", str(fit_config), "--output-path", str(out / "fit_eval.json")], log)

    use_clip = clip_available("ViT-B-16", "laion2b_s34b_b88k")
    edit_flags = ["--pipeline.model.prompt", args.prompt] if use_clip else ["--pipeline.model.lam-clip", "0"]
    run([tool("ns-train"), "gridinr-edit", *common, "--timestamp", "edit", "--max-num-iterations", str(args.edit_iterations),
         "--pipeline.stage1-config", str(fit_config), "--pipeline.steps-per-render", "20", *edit_flags], log)
    edit_config = next(runs.glob("*/gridinr-edit/edit/config.yml"))
    run([tool("ns-eval"), "--load-config", str(edit_config), "--output-path", str(out / "edit_eval.json")], log)

    run([tool("gridinr-render"), "orbit", "--load-config", str(fit_config), "--frames", "24", "--output", str(out / "orbit.mp4")], log)
    run([tool("gridinr-report"), str(edit_config.parent)], log)

    fit_results = json.loads((out / "fit_eval.json").read_text())["results"]
    edit_results = json.loads((out / "edit_eval.json").read_text())["results"]
    summary = {"stage1": fit_results, "stage2": edit_results, "clip_term": use_clip,
               "fit_run": str(fit_config.parent), "edit_run": str(edit_config.parent)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nStage 1: volume PSNR {fit_results['volume_psnr']:.2f} dB, image PSNR {fit_results['psnr']:.2f} dB, "
          f"SSIM {fit_results['ssim']:.4f}, {fit_results['ms_per_frame']:.0f} ms/frame")
    print(f"Stage 2: PSNR {edit_results['psnr']:.2f} dB to the references, SSIM {edit_results['ssim']:.4f}, "
          f"CLIP cosine {edit_results.get('clip_cosine')}")
    print(f"Look at: {out}/orbit.mp4, {edit_config.parent}/report/*.png, {edit_config.parent}/renders/, {out}/summary.json")


if __name__ == "__main__":
    main()
