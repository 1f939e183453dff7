"""Dotted overrides: YAML for typed fields, the text as it is for string fields."""
from pathlib import Path

import pytest

from dptrain.configio import load
from dptrain.errors import UserError
from dptrain.train.config import TrainConfig

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_string_field_takes_the_text_as_it_is():
    cfg = load(TrainConfig, DEMO, ["export.sample_prompt=KING HENRY:", "out_dir=runs/a: b",
                                   "export.hf_dir=[not a list]"])
    assert cfg.export.sample_prompt == "KING HENRY:"
    assert cfg.out_dir == "runs/a: b"
    assert cfg.export.hf_dir == "[not a list]"


def test_optional_string_field_accepts_null():
    assert load(TrainConfig, DEMO, ["export.sample_prompt=null"]).export.sample_prompt is None


def test_typed_fields_still_parse_as_yaml():
    cfg = load(TrainConfig, DEMO, ["privacy.target_epsilon=4", "privacy.steps=7"])
    assert cfg.privacy.target_epsilon == 4.0
    assert cfg.privacy.steps == 7


@pytest.mark.parametrize("override, message", [
    ("privacy.target_epsilon=[1", "not valid YAML"),
    ("privacy.target_epsilon=many", "expected a number"),
    ("privacy.nope=1", "unknown config key 'privacy.nope'"),
    ("privacy", "not of the form key=value"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message):
        load(TrainConfig, DEMO, [override])
