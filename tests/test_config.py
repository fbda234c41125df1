"""The config system: YAML files, dotted overrides, strict keys with suggestions, types."""

import pytest
import yaml

from sffn_lab.config import Config, all_keys, load_config, parse_override, save_config, to_dict
from sffn_lab.config_help import complete_override, key_help
from sffn_lab.errors import UserError
from sffn_lab.experiments import DEFAULT_CONFIG


def test_defaults_and_overrides_apply(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 64\ntrain:\n  lr: 1\n")
    cfg = load_config(path, ["model.n_layers=3", "train.max_steps=7", "data.corpus=foo.txt"])
    assert cfg.model.d_model == 64 and cfg.model.n_layers == 3
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.data.corpus == "foo.txt"


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["model.ffn.d_ff=96", "name=xyz"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("model.d_modle=3", "model.d_model"),
        ("train.max_step=3", "train.max_steps"),
        ("modle.d_model=3", "model.d_model"),
    ],
)
def test_unknown_override_key_suggests_closest(override, suggestion):
    with pytest.raises(UserError, match=f"Did you mean '{suggestion}'"):
        load_config(None, [override])


def test_unknown_yaml_key_suggests_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  warmup_step: 3\n")
    with pytest.raises(UserError, match=r"'train\.warmup_step'.*Did you mean 'warmup_steps'"):
        load_config(path)


@pytest.mark.parametrize(
    "override", ["model.d_model=abc", "train.lr=[1]", "model.tie_embeddings=3", "train.max_steps=1.5"]
)
def test_wrong_type_is_rejected(override):
    with pytest.raises(UserError, match="expects a"):
        load_config(None, [override])


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="key=value"):
        parse_override("model.d_model")


def test_cross_field_validation():
    with pytest.raises(UserError, match="divisible"):
        load_config(None, ["model.d_model=30", "model.n_heads=4"])
    with pytest.raises(UserError, match=r"splits d_model \(65\) in halves"):  # refused before the layer is built
        load_config(None, ["model.ffn.kind=pkm", "model.ffn.pkm.query=input", "model.d_model=65", "model.n_heads=5",
                           "model.positions=learned"])


def test_every_leaf_key_is_listed():
    keys = all_keys(Config)
    assert "model.ffn.kind" in keys and "train.lr" in keys and "data.synthetic.seed" in keys
    assert "model" not in keys


def test_config_show_prints_the_resolved_config_and_keys_lists_every_key(capsys):
    from tests.support import run_cli

    code, out, err = run_cli(["config", "show", "--set", "model.ffn.kind=sigma_moe", "--set", "train.lr=0.002"], capsys)
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["model"]["ffn"]["kind"] == "sigma_moe" and shown["train"]["lr"] == 0.002
    assert shown == to_dict(load_config(DEFAULT_CONFIG, ["model.ffn.kind=sigma_moe", "train.lr=0.002"]))

    code, out, err = run_cli(["config", "keys"], capsys)
    assert code == 0, err
    rows = key_help()
    assert [r.key for r in rows] == all_keys() and all(r.help for r in rows)  # every key documented
    assert all(r.key in out for r in rows)


def test_set_completion_offers_matching_keys():
    assert complete_override("model.ffn.sig") == [k + "=" for k in all_keys() if k.startswith("model.ffn.sig")]
    assert "train.precision=" in complete_override("train.pre") and complete_override("train.lr=1") == []
