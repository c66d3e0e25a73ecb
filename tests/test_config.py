from __future__ import annotations

import pytest

from vfsearch.core.config import Config, load_config, parse_overrides, with_overrides
from vfsearch.core.errors import UserError


def test_flatten_round_trip():
    cfg = with_overrides(
        Config(), {"model.depth": 5, "loss.dice_weight": 0.5, "data.plane": "axial"}
    )
    flat = cfg.flatten()
    assert flat["model.depth"] == 5 and flat["data.plane"] == "axial"
    assert Config.from_flat(flat) == cfg


def test_overrides_are_coerced_to_field_types():
    cfg = load_config(
        None, ["model.depth=3", "model.attention=false", "train.lr=3e-4", "data.patch_size=64"]
    )
    assert cfg.model.depth == 3 and cfg.model.attention is False
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.data.patch_size == 64


def test_yaml_nested_and_dotted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  temporal: convlstm\nloss.bce_weight: 2\n")
    cfg = load_config(str(path))
    assert cfg.model.temporal == "convlstm" and cfg.loss.bce_weight == 2.0


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.nope=1"], "unknown key 'model.nope'"),
        (["model.depth=7"], "model.depth must be 3..5"),
        (["data.seq_len=4"], "data.seq_len must be odd"),
        (["model.temporal=gru"], "model.temporal must be one of"),
        (["model.depth=five"], "model.depth must be int"),
        (["loss.adv_weight=0.1"], "needs model.gan=true"),
        (["data.patch_size=100", "model.depth=4"], "divisible"),
        (["train.val_windows=-2"], "train.val_windows must be >= 0"),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, overrides)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="expected key=value"):
        parse_overrides(["model.depth"])
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
