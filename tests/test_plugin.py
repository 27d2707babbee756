"""Registration with nerfstudio: entry points load, and nerfstudio's own CLI sees our methods."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

from nerfstudio.plugins.registry import discover_methods
from nerfstudio.plugins.registry_dataparser import discover_dataparsers


def test_entry_points_are_registered():
    assert {"gridinr-fit", "gridinr-edit"} <= set(entry_points(group="nerfstudio.method_configs").names)
    assert "gridinr-volume" in entry_points(group="nerfstudio.dataparser_configs").names


def test_nerfstudio_discovers_methods_and_dataparser():
    methods, descriptions = discover_methods()
    assert methods["gridinr-fit"].method_name == "gridinr-fit"
    assert methods["gridinr-edit"].method_name == "gridinr-edit"
    dataparsers, _ = discover_dataparsers()
    assert type(dataparsers["gridinr-volume"]).__name__ == "VolumeDataParserConfig"


def test_param_groups_have_optimizers():
    """Every get_param_groups() key needs an optimizer entry (nerfstudio fails at setup otherwise)."""
    methods, _ = discover_methods()
    assert set(methods["gridinr-fit"].optimizers) == {"encoding", "mlp"}
    assert set(methods["gridinr-edit"].optimizers) == {"transfer_mlp", "transfer_parts"}


def test_dataparser_spec_imports_without_pipelines():
    """The dataparser entry point must not pull in datamanagers/pipelines (circular import in nerfstudio)."""
    code = (
        "import sys; import gridinr_nerfstudio.data.dataparser; "
        "bad = [m for m in sys.modules if m.startswith('gridinr_nerfstudio') and ('pipeline' in m or 'datamanager' in m)]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ns_train_help_lists_our_method():
    result = subprocess.run(
        [sys.executable, "-m", "nerfstudio.scripts.train", "gridinr-fit", "--help"], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage1" not in result.stdout  # fit has no stage-1 option; edit does
    assert "subsample-factor" in result.stdout


def test_method_viewers_listen_on_loopback():
    """ns-train's viewer binds 127.0.0.1 unless the user opts in with --viewer.websocket-host 0.0.0.0."""
    from nerfstudio.configs.base_config import ViewerConfig

    methods, _ = discover_methods()
    assert ViewerConfig().websocket_host == "0.0.0.0"  # nerfstudio's default, which ours must override
    for name in ("gridinr-fit", "gridinr-edit"):
        assert methods[name].viewer.websocket_host == "127.0.0.1"
