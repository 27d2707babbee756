"""Every option of gridinr-fit and gridinr-edit(-fast) has a row in the one option table (stages/option_table.py).

The walk goes over the methods' registered configs (what `ns-train METHOD --help` lists): a new option added to
any of their dataclasses (ours or nerfstudio's) without a row fails here, so it cannot skip validation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gridinr_nerfstudio.gridinr_config import gridinr_edit, gridinr_edit_fast, gridinr_fit
from gridinr_nerfstudio.stages.option_table import OPTION_TABLE, SWITCHES_THAT_MAY_CHANGE
from gridinr_nerfstudio.stages.options import Option, first_bad_option, iter_options, matches, table_entry

METHODS = {"gridinr-fit": gridinr_fit, "gridinr-edit": gridinr_edit, "gridinr-edit-fast": gridinr_edit_fast}


def options_without_rows(config) -> list[str]:
    """Paths of the options (on/off switches aside) that have no row in the table."""
    return [option.path for option in iter_options(config)
            if table_entry(OPTION_TABLE, option.path) is None and not isinstance(option.value, bool)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_option_of_every_method_has_a_rule(method: str) -> None:
    config = METHODS[method].config
    assert options_without_rows(config) == []
    assert first_bad_option(config, OPTION_TABLE) is None  # the defaults pass their own rules
    paths = [option.path for option in iter_options(config)]
    assert len(paths) == len(set(paths)) > 100  # ours and nerfstudio's: the whole tree, not a few names


def test_no_row_is_left_without_an_option() -> None:
    """Rows of options that no longer exist (renamed, removed) would hide a missing row for the new name."""
    paths = {option.path for spec in METHODS.values() for option in iter_options(spec.config)}
    assert [pattern for pattern in OPTION_TABLE if not any(matches(pattern, path) for path in paths)] == []
    assert [switch for switch in SWITCHES_THAT_MAY_CHANGE if switch not in paths] == []


def test_a_new_option_without_a_row_is_found() -> None:
    """The guard itself: an option added to a config's dataclass shows up in the walk (also inside dicts)."""
    from gridinr_nerfstudio.fields.volume_field import VolumeFieldSettings

    @dataclasses.dataclass
    class WiderField(VolumeFieldSettings):
        feature_scale: float = 1.0
        lookup_table: Path = Path("table.bin")
        enabled: bool = True  # a switch: no row needed

    config = gridinr_fit.config
    config = dataclasses.replace(config, pipeline=dataclasses.replace(
        config.pipeline, model=dataclasses.replace(config.pipeline.model, field=WiderField())))
    config.optimizers = dict(config.optimizers, extra={"optimizer": dataclasses.replace(
        config.optimizers["mlp"]["optimizer"])})  # a new group is covered by the `optimizers.*` rows
    assert options_without_rows(config) == ["pipeline.model.field.feature_scale", "pipeline.model.field.lookup_table"]


def test_option_flags_are_what_ns_train_accepts() -> None:
    """Messages name options as tyro spells them on the command line (dashes, also in dict keys)."""
    flags = {option.path: option.flag for option in iter_options(gridinr_fit.config)}
    assert flags["pipeline.model.field.log2_hashmap_size"] == "--pipeline.model.field.log2-hashmap-size"
    assert flags["optimizers.encoding.optimizer.lr"] == "--optimizers.encoding.optimizer.lr"
    assert flags["pipeline.model.loss_coefficients"] == "--pipeline.model.loss-coefficients"
    edit_flags = {option.flag for option in iter_options(gridinr_edit.config)}
    assert "--optimizers.transfer-mlp.optimizer.lr" in edit_flags


def test_unsupported_options_accept_only_their_default() -> None:
    config = dataclasses.replace(gridinr_fit.config)
    (option,) = [o for o in iter_options(config) if o.path == "pipeline.datamanager.patch_size"]
    rule = table_entry(OPTION_TABLE, option.path).rule
    assert rule.problem(option, config) is None
    changed = Option(option.path, 4, option.default, option.annotation)
    assert rule.problem(changed, config).startswith("is not supported by gridinr-fit")
