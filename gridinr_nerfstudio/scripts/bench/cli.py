"""``gridinr-bench``: run the project's benchmarks; ``all`` runs every registered one with its defaults.

A benchmark is a module ``gridinr_nerfstudio.scripts.bench.<name>`` listed in ``BENCHMARKS`` that provides
    add_parser(subparsers) -> argparse.ArgumentParser   # adds subcommand <name> with its options
    run(args: argparse.Namespace) -> dict               # prints a readable report, returns numbers
The dispatcher adds ``--json PATH`` to every subcommand and writes what ``run`` returns there
(``all`` writes ``{name: result}`` and skips benchmarks with required options); an existing file is refused before
the benchmark runs unless ``--overwrite`` (safe_write.py). A listed module whose file does
not exist yet is left out.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from gridinr_nerfstudio.safe_write import OutputError, check_target, write_text

BENCHMARKS = ("encoding", "fit", "render", "compression", "memory", "sequence", "edit", "sweep", "scale", "contention")


def available_benchmarks() -> dict[str, ModuleType]:
    """Registered benchmark modules that exist (import errors inside an existing module propagate)."""
    modules = {}
    for name in BENCHMARKS:
        module_name = f"gridinr_nerfstudio.scripts.bench.{name}"
        if importlib.util.find_spec(module_name) is not None:
            modules[name] = importlib.import_module(module_name)
    return modules


def build_parser(modules: dict[str, ModuleType]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gridinr-bench", description="Run gridinr-nerfstudio benchmarks; `all` runs every one with its defaults."
    )
    subparsers = parser.add_subparsers(dest="benchmark", required=True)
    for module in modules.values():
        benchmark = module.add_parser(subparsers)
        benchmark.add_argument("--json", type=Path, help="write the measured numbers to this file")
        benchmark.add_argument("--overwrite", action="store_true", help="replace existing output files (--json, ...)")
    everything = subparsers.add_parser("all", help="run every benchmark with its default options")
    everything.add_argument("--json", type=Path, help="write {benchmark: numbers} to this file")
    everything.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return parser


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse existing output files (without --overwrite) before a benchmark spends minutes measuring."""
    for path in (getattr(args, "json", None), getattr(args, "markdown", None), getattr(args, "figure", None)):
        if path is not None:
            try:
                check_target(path, args.overwrite)
            except OutputError as error:
                raise SystemExit(f"gridinr-bench: error: {error}") from None


def main(argv: list[str] | None = None) -> None:
    modules = available_benchmarks()
    parser = build_parser(modules)
    args = parser.parse_args(argv)
    check_outputs(args)
    if args.benchmark == "all":
        result = {}
        for name, module in modules.items():
            print(f"== {name}", flush=True)
            try:
                defaults = parser.parse_args([name])
            except SystemExit:  # argparse has printed which required option is missing
                print(f"skipped {name}: it has required options (gridinr-bench {name} --help)", flush=True)
                continue
            result[name] = module.run(defaults)
    else:
        result = modules[args.benchmark].run(args)
    if args.json is not None:
        write_text(args.json, json.dumps(result, indent=2) + "\n", overwrite=args.overwrite)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
