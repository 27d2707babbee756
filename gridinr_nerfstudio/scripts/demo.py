"""The main job (`make demo`): stage 1 then stage 2 on the built-in volume, evaluated, with a report.

Runs the real command-line tools one after another, exactly as a user would type them:

1. `ns-train gridinr-fit` on the built-in volume, then `ns-eval` (volume PSNR, PSNR/SSIM/LPIPS, speed);
2. `ns-train gridinr-edit` on that run with a targets file (`demo_output/targets.json`): the double helix (values
   0.8-1, the built-in volume's tubes) recoloured like the shipped "ocean" palette, a colour target that needs no
   CLIP, so every machine shows an edit; with CLIP weights in the cache also the prompt on the rest of the values
   (without them a note says so), then `ns-eval`;
3. `gridinr-render orbit` (a short video) and `gridinr-report` (plots and a before/after figure).

Everything lands in OUTPUT_DIR; `summary.json` lists the figures. OUTPUT_DIR is replaced when a previous demo
wrote it (it holds demo.log) or it is empty; any other folder only with --overwrite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from gridinr_nerfstudio.eval.train_log import ETA_NAME, read_train_log
from gridinr_nerfstudio.gridinr_config import fit_trainer_config
from gridinr_nerfstudio.stages.edit.clip_loss import ClipWeightsUnavailable, resolve_clip_weights


def run(command: list[str], log: Path, progress: Optional[Callable[[], Optional[str]]] = None,
        every: float = 1.0, print_every: float = 10.0) -> None:
    """Run one CLI step, its output appended to `log`, while the terminal shows its progress: elapsed time and,
    for training, what `progress()` reads from the run's training log. Stops the demo with the log's tail if
    the step fails."""
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    status = Status(sys.stdout, print_every)
    with log.open("a") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        while True:
            try:
                returncode = process.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                status.show(time.perf_counter() - started, progress() if progress is not None else None)
    detail = progress() if progress is not None else None
    status.done(f"  done in {time.perf_counter() - started:.0f} s" + (f"  ({detail})" if detail else ""))
    if returncode != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise SystemExit(f"demo: step failed (exit {returncode}): {' '.join(command)}; full log in {log}")


class Status:
    """One progress line: rewritten in place on a terminal; on a pipe (CI logs) a new line when it changes,
    at most every `print_every` seconds (and every 6 x `print_every` seconds when it does not)."""

    def __init__(self, stream, print_every: float = 10.0):
        self.stream = stream
        self.print_every = print_every
        self.tty = stream.isatty()
        self.last_text: Optional[str] = ""
        self.last_time, self.width = -1e9, 0

    def show(self, elapsed: float, detail: Optional[str]) -> None:
        text = f"  {elapsed:4.0f} s" + (f"  {detail}" if detail else "")
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
            self.stream.flush()
        elif time.monotonic() - self.last_time >= (self.print_every if detail != self.last_text else 6 * self.print_every):
            print(text, file=self.stream, flush=True)
            self.last_text, self.last_time = detail, time.monotonic()

    def done(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width) + "\n")
            self.stream.flush()
        else:
            print(text, file=self.stream, flush=True)


def training_progress(pattern: str, root: Path, total: int) -> Callable[[], Optional[str]]:
    """Reads the newest `train_log.csv` matching `root/pattern`: step of total, ETA, loss, PSNR and each edit
    target's loss."""

    def describe() -> Optional[str]:
        logs = sorted(root.glob(pattern))
        if not logs:
            return "starting (loading, rendering references)"
        series = read_train_log(logs[-1])
        if "Train Loss" not in series:
            return "starting"
        step = series["Train Loss"][0][-1]
        parts = [f"step {step}/{total} ({100.0 * step / max(total, 1):.0f}%)"]
        if ETA_NAME in series:
            parts.append(f"ETA {series[ETA_NAME][1][-1]:.0f} s")
        parts.append(f"loss {series['Train Loss'][1][-1]:.4g}")
        for name, (_, values) in series.items():
            if name.startswith(("Train Metrics Dict/", "Train Loss Dict/")) and any(
                    word in name for word in ("psnr", "clip", "target")):
                unit = " dB" if "psnr" in name else ""
                parts.append(f"{name.rpartition('/')[2]} {values[-1]:.4g}{unit}")
        return ", ".join(parts)

    return describe


def _number(results: dict, key: str, spec: str) -> str:
    value = results.get(key)
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def tool(name: str) -> str:
    """Path of a console script installed next to this Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def clip_available(model: str, pretrained: str) -> bool:
    try:
        resolve_clip_weights(model, pretrained)
        return True
    except ClipWeightsUnavailable as error:
        print(f"note: {error}\nnote: the demo's edit uses its colour target only (it needs no CLIP weights).",
              flush=True)
        return False


COLOR_TARGET = {"range": [0.8, 1.0], "palette": "ocean", "name": "helix like the ocean palette"}
"""The demo's colour target: the built-in volume's tubes (value 1) recoloured like the shipped palette."""


def demo_targets(prompt: str, use_clip: bool) -> dict:
    """The targets file of the demo's edit: the colour target, and the prompt on the other values with CLIP."""
    targets = [COLOR_TARGET]
    if use_clip:
        targets.append({"range": [0.0, 0.75], "prompt": prompt})
    return {"targets": targets}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output"))
    parser.add_argument("--data", default="builtin-default", help="volume to use (default: the built-in volume)")
    parser.add_argument("--fit-iterations", type=int, default=fit_trainer_config().max_num_iterations,
                        help="stage-1 iterations (gridinr-fit's default on this machine)")
    parser.add_argument("--edit-iterations", type=int, default=60)
    parser.add_argument("--prompt", default="a glowing orange molecule")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete --output-dir first even if a previous demo did not write it (default: refuse)")
    args = parser.parse_args(argv)

    out = args.output_dir.resolve()
    if out.exists():
        if not (out.is_dir() and ((out / "demo.log").is_file() or not any(out.iterdir()))) and not args.overwrite:
            sys.exit(f"demo: error: {out} exists and is not a previous demo's output (no demo.log in it): choose "
                     "another --output-dir, or --overwrite to delete it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True)
    log = out / "demo.log"
    runs = out / "runs"
    common = ["--vis", "tensorboard", "--output-dir", str(runs), "--viewer.quit-on-train-completion", "True"]

    run([tool("ns-train"), "gridinr-fit", *common, "--timestamp", "fit", "--max-num-iterations", str(args.fit_iterations),
         "--pipeline.datamanager.dataparser.data", args.data], log,
        training_progress("*/gridinr-fit/fit/train_log.csv", runs, args.fit_iterations))
    fit_config = next(runs.glob("*/gridinr-fit/fit/config.yml"))
    run([tool("ns-eval"), "--load-config", str(fit_config), "--output-path", str(out / "fit_eval.json")], log)

    use_clip = clip_available("ViT-B-16", "laion2b_s34b_b88k")
    targets = out / "targets.json"
    targets.write_text(json.dumps(demo_targets(args.prompt, use_clip), indent=1) + "\n")
    edit_flags = ["--pipeline.model.targets", str(targets)]
    run([tool("ns-train"), "gridinr-edit", *common, "--timestamp", "edit", "--max-num-iterations", str(args.edit_iterations),
         "--pipeline.stage1-config", str(fit_config), "--pipeline.steps-per-render", "20", *edit_flags], log,
        training_progress("*/gridinr-edit/edit/train_log.csv", runs, args.edit_iterations))
    edit_config = next(runs.glob("*/gridinr-edit/edit/config.yml"))
    run([tool("ns-eval"), "--load-config", str(edit_config), "--output-path", str(out / "edit_eval.json")], log)

    run([tool("gridinr-render"), "orbit", "--load-config", str(fit_config), "--frames", "24", "--output", str(out / "orbit.mp4")], log)
    run([tool("gridinr-report"), str(edit_config.parent)], log)

    fit_results = json.loads((out / "fit_eval.json").read_text())["results"]
    edit_results = json.loads((out / "edit_eval.json").read_text())["results"]
    summary = {"stage1": fit_results, "stage2": edit_results, "clip_term": use_clip,
               "targets": json.loads(targets.read_text())["targets"],
               "fit_run": str(fit_config.parent), "edit_run": str(edit_config.parent)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [("", "volume PSNR", "image PSNR", "SSIM", "LPIPS", "CLIP cosine", "colour distance", "ms/frame"),
            ("stage 1 (fit)", _number(fit_results, "volume_psnr", ".2f"), _number(fit_results, "psnr", ".2f"),
             _number(fit_results, "ssim", ".4f"), _number(fit_results, "lpips", ".4f"), "", "",
             _number(fit_results, "ms_per_frame", ".0f")),
            ("stage 2 (edit)", "", _number(edit_results, "psnr", ".2f"), _number(edit_results, "ssim", ".4f"),
             _number(edit_results, "lpips", ".4f"), _number(edit_results, "clip_cosine", ".4f"),
             _number(edit_results, "target1_color_distance", ".4f"), _number(edit_results, "ms_per_frame", ".0f"))]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print("(stage 2 PSNR/SSIM/LPIPS compare the edit with the unedited references: how far the look moved; colour "
          "distance: the helix's rendered colours to the palette's, sliced W2)")
    print(f"Look at: {out}/orbit.mp4, {edit_config.parent}/report/*.png, {edit_config.parent}/renders/, {out}/summary.json")


if __name__ == "__main__":
    main()
