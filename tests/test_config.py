"""Config values from files and flags are converted to their declared types and range-checked."""

import pytest
import yaml
from click.testing import CliRunner

from cddrec.app.train import main as train_main
from cddrec.config import AUTO_RANK_MAX, CDDRecConfig, read_config_file
from cddrec.errors import ConfigError


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_values_are_converted_to_the_declared_types(tmp_path):
    # PyYAML reads 1e-3 and 4e-2 as strings; quoted and integral-float ints; boolean words
    p = _yaml(tmp_path, "lr: 1e-3\nbeta_T: 4e-2\nhidden_size: '16'\nnum_heads: 2.0\ndecoder: 'false'\n"
                        "infonce_cosine: 'no'\n")
    raw = yaml.safe_load(p.read_text())
    assert isinstance(raw["lr"], str)  # the reason this matters
    values = read_config_file(p)
    cfg = CDDRecConfig(**values)
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.beta_T == 0.04 and cfg.hidden_size == 16 and isinstance(cfg.hidden_size, int)
    assert cfg.num_heads == 2 and isinstance(cfg.num_heads, int)
    assert cfg.decoder is False and cfg.infonce_cosine is False


@pytest.mark.parametrize("text, field", [
    ("hidden_size: 16.5", "hidden_size"), ("seed: null", "seed"), ("decoder: maybe", "decoder"),
    ("lr: fast", "lr"), ("lr: .nan", "lr"), ("num_heads: 0", "num_heads"), ("dropout: 1.0", "dropout"),
    ("loss: mse", "loss"), ("device: mps", "device"), ("batch_size: true", "batch_size"),
])
def test_bad_file_values_name_the_field_and_what_was_expected(tmp_path, text, field):
    p = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        read_config_file(p)
    msg = str(e.value)
    assert "\n" not in msg and f"'{field}'" in msg and "expected" in msg and str(p) in msg


@pytest.mark.parametrize("args", [["--num-heads", "0"], ["--num-heads", "-4"], ["--num-layers", "-2"],
                                  ["--time-budget", "-1"], ["--patience", "0"], ["--lam", "-1"], ["--epochs", "0"],
                                  ["--device", "mps"], ["--device", ""], ["--lr", "0"], ["--seed", "-1"],
                                  ["--dropout", "1.5"]])
def test_bad_flags_are_one_line_errors(tmp_path, tiny_data_file, args):
    out = tmp_path / "m.pt"
    r = CliRunner().invoke(train_main, [str(tiny_data_file), "-o", str(out), "--quiet", *args])
    assert r.exit_code == 2 or r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)  # no traceback
    flag = args[0].lstrip("-").replace("-", "_")
    assert args[0] in r.output or f"'{flag}'" in r.output, r.output
    assert not out.exists()


def test_config_from_dict_rejects_untyped_values():
    with pytest.raises(ConfigError, match="'seed'"):
        CDDRecConfig(seed=None)
    with pytest.raises(ConfigError, match="multiple of num_heads"):
        CDDRecConfig(hidden_size=10, num_heads=4)
    assert CDDRecConfig(hidden_size="16", num_heads=4).hidden_size == 16


def test_rank_steps_auto_follows_catalogue_times_steps():
    small = CDDRecConfig(num_items=AUTO_RANK_MAX // 20, steps=20)
    big = CDDRecConfig(num_items=AUTO_RANK_MAX // 20 + 1, steps=20)
    assert small.rank_steps == "auto" and not small.rank_last_only
    assert big.rank_last_only
    assert not big.replace(rank_steps="all").rank_last_only and small.replace(rank_steps="last").rank_last_only
