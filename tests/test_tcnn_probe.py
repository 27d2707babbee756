"""The tiny-cuda-nn probe on the CPU: stand-in modules whose forward/backward works, crashes (a real SIGSEGV,
which no try/except could catch) or gives NaNs, run in the probe's child process as tinycudann would be."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from gridinr_nerfstudio.fields.hash_grid import _backend, tcnn_probe

FAKE_ENCODINGS = {
    # A working encoding: features linear in a (levels * features, 3) table, as differentiable as a hash grid.
    "fake_tcnn_works": "return points @ self.params.view(8, 3).t()",
    # Dies the way tiny-cuda-nn did on an H200: a segmentation fault inside the forward pass.
    "fake_tcnn_segfaults": "import signal; os.kill(os.getpid(), signal.SIGSEGV)",
    "fake_tcnn_gives_nan": "return points @ self.params.view(8, 3).t() * float('nan')",
}


@pytest.fixture
def fake_modules(tmp_path, monkeypatch) -> Path:
    """Importable stand-ins for tinycudann (here and in the probe's child process)."""
    root = tmp_path / "modules"
    for name, forward in FAKE_ENCODINGS.items():
        package = root / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(textwrap.dedent(f"""
            import os
            import torch

            class Encoding(torch.nn.Module):
                def __init__(self, n_input_dims, encoding_config, dtype=None):
                    super().__init__()
                    levels = encoding_config["n_levels"] * encoding_config["n_features_per_level"]
                    self.params = torch.nn.Parameter(torch.linspace(-1, 1, levels * n_input_dims))

                def forward(self, points):
                    {forward}
            """))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(tcnn_probe, "_verdicts", {})
    return root


def test_a_working_module_passes_and_the_verdict_is_cached(fake_modules, tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "tcnn_probe.json"
    result = tcnn_probe.probe("fake_tcnn_works", torch.device("cpu"), cache)
    assert result == tcnn_probe.ProbeResult(True, "")
    (entry,) = json.loads(cache.read_text()).items()
    assert entry[0].startswith("fake_tcnn_works ") and entry[1] == {"ok": True, "reason": ""}

    def no_second_probe(*args, **kwargs):
        raise AssertionError("probed again although the verdict is cached")

    monkeypatch.setattr(tcnn_probe, "_verdicts", {})  # a new process: only the file remembers
    monkeypatch.setattr(tcnn_probe, "run_probe", no_second_probe)
    assert tcnn_probe.probe("fake_tcnn_works", torch.device("cpu"), cache).ok


def test_a_segfault_in_the_probe_is_refused_with_its_reason(fake_modules, tmp_path):
    cache = tmp_path / "tcnn_probe.json"
    result = tcnn_probe.probe("fake_tcnn_segfaults", torch.device("cpu"), cache)
    assert not result.ok and "crashed with SIGSEGV" in result.reason  # this process survived it
    assert json.loads(cache.read_text()).popitem()[1] == {"ok": False, "reason": result.reason}


def test_wrong_results_are_refused(fake_modules, tmp_path):
    result = tcnn_probe.probe("fake_tcnn_gives_nan", torch.device("cpu"), tmp_path / "tcnn_probe.json")
    assert not result.ok and "non-finite" in result.reason


def test_a_new_build_is_probed_again(fake_modules, tmp_path, monkeypatch):
    cache = tmp_path / "tcnn_probe.json"
    assert tcnn_probe.probe("fake_tcnn_works", torch.device("cpu"), cache).ok
    source = fake_modules / "fake_tcnn_works" / "__init__.py"
    source.write_text(source.read_text().replace(FAKE_ENCODINGS["fake_tcnn_works"], FAKE_ENCODINGS["fake_tcnn_segfaults"]))
    monkeypatch.setattr(tcnn_probe, "_verdicts", {})
    assert not tcnn_probe.probe("fake_tcnn_works", torch.device("cpu"), cache).ok  # the new build crashes
    assert len(json.loads(cache.read_text())) == 2  # one verdict per build


def test_auto_backend_refuses_a_crashing_tcnn_in_one_line(fake_modules, tmp_path, monkeypatch, capsys):
    """`tcnn_usable` (what the auto backend asks on CUDA) says no, once, in one line naming the reason."""
    monkeypatch.setenv("GRIDINR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_backend, "TCNN_MODULE", "fake_tcnn_segfaults")
    monkeypatch.setattr(_backend, "_tcnn_refusals_said", set())
    assert not _backend.tcnn_usable(torch.device("cpu"))
    assert not _backend.tcnn_usable(torch.device("cpu"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "tiny-cuda-nn not used on cpu" in lines[0] and "SIGSEGV" in lines[0]
    assert (tmp_path / "cache" / "tcnn_probe.json").is_file()


def test_auto_backend_takes_a_tcnn_that_passed(fake_modules, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRIDINR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_backend, "TCNN_MODULE", "fake_tcnn_works")
    monkeypatch.setattr(_backend, "_LAZY_MODULES", {})
    assert _backend.tcnn_usable(torch.device("cpu"))
    assert capsys.readouterr().err == ""


def test_nothing_is_probed_without_tinycudann(tmp_path, monkeypatch):
    monkeypatch.setattr(tcnn_probe, "_verdicts", {})
    monkeypatch.setattr(_backend, "TCNN_MODULE", "no_such_tcnn_module")
    monkeypatch.setattr(tcnn_probe, "run_probe", lambda *a, **k: pytest.fail("probed a module that is not installed"))
    assert not _backend.tcnn_usable(torch.device("cpu"))
