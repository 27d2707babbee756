"""Registration with nerfstudio: entry points load, and nerfstudio's own CLI sees our methods."""

from __future__ import annotations

import copy
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from nerfstudio.plugins.registry import discover_methods
from nerfstudio.plugins.registry_dataparser import discover_dataparsers
from tiny_runs import shrink_dataparser


def test_entry_points_are_registered():
    assert {"gridinr-fit", "gridinr-edit"} <= set(entry_points(group="nerfstudio.method_configs").names)
    assert "gridinr-volume" in entry_points(group="nerfstudio.dataparser_configs").names


def test_nerfstudio_discovers_methods_and_dataparser():
    methods, descriptions = discover_methods()
    assert methods["gridinr-fit"].method_name == "gridinr-fit"
    assert methods["gridinr-edit"].method_name == "gridinr-edit"
    dataparsers, _ = discover_dataparsers()
    assert type(dataparsers["gridinr-volume"]).__name__ == "VolumeDataParserConfig"


@pytest.mark.parametrize("method", ["gridinr-fit", "gridinr-edit", "gridinr-edit-fast"])
def test_param_groups_have_optimizers(method, tiny_fit_run, tmp_path):
    """Every key the model's get_param_groups() really returns has an optimizer entry, and every optimizer a group
    (nerfstudio fails at setup otherwise): the method's own config, its pipeline built as ns-train builds it, on the
    built-in volume with few small reference views (edit: on a tiny fit run, without CLIP)."""
    methods, _ = discover_methods()
    assert {"gridinr-fit", "gridinr-edit", "gridinr-edit-fast"} == {name for name in methods if name.startswith("gridinr")}
    config = copy.deepcopy(methods[method])
    if method == "gridinr-fit":
        shrink_dataparser(config.pipeline.datamanager.dataparser, tmp_path / "references")
    else:
        config.pipeline.stage1_config = tiny_fit_run
        config.pipeline.model.lam_clip = 0.0  # CLIP is kept out of the module tree; no weights here
    pipeline = config.pipeline.setup(device="cpu", test_mode="val", world_size=1, local_rank=0)
    groups = pipeline.get_param_groups()
    assert set(groups) == set(config.optimizers)
    assert all(len(params) > 0 for params in groups.values())
    trainable = {id(p) for p in pipeline.parameters() if p.requires_grad and p.numel() > 0}  # not the empty device marker
    assert {id(p) for params in groups.values() for p in params} == trainable  # nothing trains unoptimised


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
