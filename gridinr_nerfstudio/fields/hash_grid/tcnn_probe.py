"""Whether tiny-cuda-nn really works on a device: a forward and backward pass in a child process, once per build.

Why: tiny-cuda-nn ended an H200 run with a segmentation fault, which no try/except can catch; importing it proves
nothing. The ``auto`` backend therefore uses it only after this probe has run one small HashGrid encoding forward
and backward on the device in a subprocess (a crash there costs the child, not the run) and checked the outputs.
The verdict is cached per tiny-cuda-nn build (its files' sizes and times) and device (name, compute capability,
torch and CUDA versions) in ``~/.cache/gridinr/tcnn_probe.json`` (``$GRIDINR_CACHE_DIR`` or ``$XDG_CACHE_HOME``
move it); delete that file to probe again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

PROBE_TIMEOUT_S = 300.0
"""A first tiny-cuda-nn call may JIT-compile its kernels (minutes on some GPUs); longer counts as a hang."""

_PROBE_SCRIPT = r"""
import json, sys, torch
module = __import__(sys.argv[1])
device = torch.device(sys.argv[2])
config = {"otype": "HashGrid", "n_levels": 4, "n_features_per_level": 2, "log2_hashmap_size": 12,
          "base_resolution": 4, "per_level_scale": 2.0}
if device.type == "cuda":
    torch.cuda.set_device(device)
encoding = module.Encoding(3, config, dtype=torch.float32).to(device)
points = torch.rand(4096, 3, device=device, requires_grad=True)
features = encoding(points)
features.float().square().sum().backward()
if device.type == "cuda":
    torch.cuda.synchronize(device)
grad = next(p for p in encoding.parameters()).grad
problems = []
if tuple(features.shape) != (4096, 8):
    problems.append(f"forward gave shape {tuple(features.shape)}, expected (4096, 8)")
if not bool(torch.isfinite(features).all()):
    problems.append("forward gave non-finite values")
if grad is None or not bool(torch.isfinite(grad).all()) or not bool((grad != 0).any()):
    problems.append("backward gave no finite, non-zero table gradient")
print(json.dumps({"ok": not problems, "reason": "; ".join(problems)}))
"""


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str
    """Why it is not used ("" when ok)."""


def cache_path() -> Path:
    """Where verdicts are kept: $GRIDINR_CACHE_DIR, else $XDG_CACHE_HOME/gridinr, else ~/.cache/gridinr."""
    root = os.environ.get("GRIDINR_CACHE_DIR")
    if root is None:
        root = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gridinr")
    return Path(root) / "tcnn_probe.json"


def build_identity(module_name: str) -> str | None:
    """A digest of the installed module's files (paths, sizes, modification times), found without importing it;
    None when it is not installed."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin)
    root = origin.parent if origin.name == "__init__.py" else origin
    files = sorted(root.rglob("*") if root.is_dir() else [root])
    digest = hashlib.sha256(f"{module_name}:{origin}".encode())
    for path in files:
        if path.is_file() and path.suffix in (".py", ".so", ".pyd", ".dll"):
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def device_identity(device: torch.device) -> str:
    """The device as the probe's verdict depends on it: GPU model and compute capability, torch and CUDA."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} sm_{major}{minor} torch {torch.__version__} cuda {torch.version.cuda}"
    return f"{device.type} torch {torch.__version__}"


def run_probe(module_name: str, device: torch.device, timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """One forward and backward of `module_name`'s ``Encoding`` on `device`, in a child process."""
    command = [sys.executable, "-c", _PROBE_SCRIPT, module_name, str(device)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"its probe did not finish in {timeout:.0f} s")
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return ProbeResult(False, f"its probe (a forward and backward pass) crashed with {name}")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return ProbeResult(False, f"its probe failed (exit {done.returncode}): {last[:200]}")
    try:
        verdict = json.loads(lines[-1])
        return ProbeResult(bool(verdict["ok"]), str(verdict["reason"]))
    except (ValueError, KeyError, TypeError):
        return ProbeResult(False, f"its probe printed {lines[-1][:200]!r}")


_verdicts: dict[tuple[str, str], ProbeResult] = {}
"""This process's verdicts: (module, device) -> result."""


def probe(module_name: str, device: torch.device, cache: Path | None = None) -> ProbeResult:
    """Whether `module_name` (tiny-cuda-nn: ``tinycudann``) ran a forward and backward on `device`: from this
    process's memory, else the cache file, else a new probe (then cached)."""
    device = torch.device(device)
    key = (module_name, str(device))
    if key in _verdicts:
        return _verdicts[key]
    build = build_identity(module_name)
    if build is None:
        result = ProbeResult(False, f"{module_name} is not installed")
    else:
        cache = cache_path() if cache is None else cache
        entry = f"{module_name} {build} | {device_identity(device)}"
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
        if not isinstance(known, dict):
            known = {}
        if isinstance(known.get(entry), dict) and "ok" in known[entry]:
            result = ProbeResult(bool(known[entry]["ok"]), str(known[entry].get("reason", "")))
        else:
            result = run_probe(module_name, device)
            known[entry] = {"ok": result.ok, "reason": result.reason}
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                partial = cache.with_name(f".{cache.name}.{os.getpid()}.partial")
                partial.write_text(json.dumps(known, indent=1) + "\n")
                partial.replace(cache)
            except OSError:
                pass  # an unwritable cache only means probing again next time
    _verdicts[key] = result
    return result
