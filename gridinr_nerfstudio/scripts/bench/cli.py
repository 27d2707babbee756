"""``gridinr-bench``: run the project's benchmarks; ``all`` runs every registered one with its defaults.

A benchmark is a module ``gridinr_nerfstudio.scripts.bench.<name>`` listed in ``BENCHMARKS`` that provides
    add_parser(subparsers) -> argparse.ArgumentParser   # adds subcommand <name> with its options
    run(args: argparse.Namespace) -> dict               # prints a readable report, returns numbers
The dispatcher adds ``--json PATH`` to every subcommand and writes what ``run`` returns there
(``all`` writes ``{name: result}`` and skips benchmarks with required options). A listed module whose file does
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

BENCHMARKS = ("encoding", "fit", "render", "compression", "memory", "sequence", "edit", "sweep", "scale")


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
        module.add_parser(subparsers).add_argument("--json", type=Path, help="write the measured numbers to this file")
    everything = subparsers.add_parser("all", help="run every benchmark with its default options")
    everything.add_argument("--json", type=Path, help="write {benchmark: numbers} to this file")
    return parser


def main(argv: list[str] | None = None) -> None:
    modules = available_benchmarks()
    parser = build_parser(modules)
    args = parser.parse_args(argv)
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
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
