"""`gridinr-eval`: ns-eval for the run folder it is given, wherever it lies.

    gridinr-eval --load-config RUN/config.yml [--output-path out.json] [--render-output-path DIR] [--overwrite]

nerfstudio's `ns-eval` follows the paths written in config.yml: on a copied or moved run it evaluates the original's
checkpoint and appends to the original's metrics.csv, and on a folder without a checkpoint it stops with a
traceback. `gridinr-eval` reads the run folder that holds the config.yml (`runs.load_run_pipeline`): the newest
checkpoint of RUN/nerfstudio_models that loads, an edit run's RUN/stage1_field.ckpt, and RUN/metrics.csv, where the
evaluation's row goes. The evaluation is nerfstudio's (the pipeline's `get_average_eval_image_metrics` with the
standard deviations) and the JSON is ns-eval's: experiment_name, method_name, checkpoint, results.

Outputs follow safe_write.py: an existing JSON, or evaluation images in --render-output-path, are replaced only
with --overwrite, and appear only when complete. Bad input ends with exit status 1 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RENDER_PATTERN = "eval_*.png"
"""The names nerfstudio gives evaluation images (eval_<key>_<index>.png)."""


class EvalError(Exception):
    """Bad input to gridinr-eval; one line naming the file or option."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridinr-eval", description="Evaluate the run folder a config.yml lies in "
                                     "(ns-eval's metrics and JSON; copied and moved runs use their own files).")
    parser.add_argument("--load-config", type=Path, required=True, help="the run's config.yml")
    parser.add_argument("--output-path", type=Path, default=Path("output.json"),
                        help="JSON file of the metrics (default output.json, as ns-eval)")
    parser.add_argument("--render-output-path", type=Path, default=None,
                        help="folder for the rendered evaluation images (eval_<key>_<index>.png)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output-path and the images of --render-output-path")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked before the run is loaded."""
    from gridinr_nerfstudio.safe_write import check_target

    if not args.load_config.is_file():
        raise EvalError(f"{args.load_config}: no such config file (give a run's config.yml)")
    if args.output_path.suffix != ".json":
        raise EvalError(f"{args.output_path}: --output-path must end in .json")
    check_target(args.output_path, args.overwrite, run_files(args.load_config))
    render = args.render_output_path
    if render is not None and render.is_dir() and any(render.glob(RENDER_PATTERN)) and not args.overwrite:
        raise EvalError(f"{render} holds {RENDER_PATTERN} images (use --overwrite to replace them)")


def run_files(config_path: Path):
    """config.yml and the checkpoints of its folder: outputs never replace them."""
    from gridinr_nerfstudio.runs import list_checkpoints
    from gridinr_nerfstudio.safe_write import ProtectedFiles

    protected = ProtectedFiles([(config_path, "the run's config")])
    for _, path in list_checkpoints(Path(config_path).parent / "nerfstudio_models"):
        protected.add(path, "a checkpoint of the run")
    return protected


def evaluate(config_path: Path, render_output_path: Path | None = None):
    """(config, checkpoint path, metrics) of the run folder holding `config_path`; the metrics row goes to its
    metrics.csv. Renders go straight to `render_output_path` (callers stage it)."""
    from gridinr_nerfstudio.runs import RunConfigError, load_run_pipeline

    try:
        config, pipeline, checkpoint, _ = load_run_pipeline(config_path, test_mode="test")
    except (RunConfigError, FileNotFoundError, ValueError) as error:
        raise EvalError(" ".join(str(error).split())) from None
    metrics = pipeline.get_average_eval_image_metrics(output_path=render_output_path, get_std=True)
    return config, checkpoint, metrics


def recorded_run_dir(config_path: Path) -> Path:
    """The run folder config.yml was written for (what ns-eval would read), as the file records it."""
    from gridinr_nerfstudio.runs import load_run_config

    config = load_run_config(config_path)
    return Path(config.get_base_dir())


def main(argv: list[str] | None = None) -> int:
    from gridinr_nerfstudio.data.volume_io import VolumeError
    from gridinr_nerfstudio.runs import RunConfigError
    from gridinr_nerfstudio.safe_write import OutputError, atomic_output, staged_folder

    args = build_parser().parse_args(argv)
    run_dir = args.load_config.parent
    try:
        check_arguments(args)
        recorded = recorded_run_dir(args.load_config)
        from contextlib import nullcontext

        renders = (staged_folder(args.render_output_path, RENDER_PATTERN, args.overwrite)
                   if args.render_output_path is not None else nullcontext(None))
        with renders as staging:
            config, checkpoint, metrics = evaluate(args.load_config, staging)
        result = {"experiment_name": config.experiment_name, "method_name": config.method_name,
                  "checkpoint": str(checkpoint), "results": metrics}
        with atomic_output(args.output_path, args.overwrite, run_files(args.load_config)) as temporary:
            temporary.write_text(json.dumps(result, indent=2), "utf8")
    except (EvalError, OutputError, RunConfigError, VolumeError, OSError) as error:
        print(f"gridinr-eval: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    if recorded.resolve() != run_dir.resolve():
        print(f"evaluated the run folder {run_dir} (its config.yml was written for {recorded}; ns-eval would have "
              "read that one)")
    print(f"checkpoint {checkpoint}; metrics row appended to {run_dir / 'metrics.csv'}")
    if args.render_output_path is not None:
        print(f"wrote the evaluation images to {args.render_output_path}")
    print(f"Saved results to: {args.output_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
