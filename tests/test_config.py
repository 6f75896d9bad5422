"""Config values from files and flags are converted to their declared types and range-checked."""

import pytest
import yaml
from click.testing import CliRunner

from cddrec.app.train import main as train_main
from cddrec.config import AUTO_RANK_MAX, ModelConfig, RunConfig, TrainConfig, from_flat, read_config_file
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
    model_cfg, train_cfg, _ = from_flat(values)
    assert train_cfg.lr == 1e-3 and isinstance(train_cfg.lr, float)
    assert model_cfg.beta_T == 0.04 and model_cfg.hidden_size == 16 and isinstance(model_cfg.hidden_size, int)
    assert model_cfg.num_heads == 2 and isinstance(model_cfg.num_heads, int)
    assert model_cfg.decoder is False and train_cfg.infonce_cosine is False


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
        TrainConfig(seed=None)
    with pytest.raises(ConfigError, match="multiple of num_heads"):
        ModelConfig(hidden_size=10, num_heads=4)
    assert ModelConfig(hidden_size="16", num_heads=4).hidden_size == 16
    with pytest.raises(ConfigError, match="'threads'"):
        RunConfig(threads=-1)


def test_rank_steps_auto_follows_catalogue_times_steps():
    small = ModelConfig(num_items=AUTO_RANK_MAX // 20, steps=20)
    big = ModelConfig(num_items=AUTO_RANK_MAX // 20 + 1, steps=20)
    auto = TrainConfig()
    assert auto.rank_steps == "auto" and not auto.rank_last_only(small)
    assert auto.rank_last_only(big)
    assert not auto.replace(rank_steps="all").rank_last_only(big) and auto.replace(rank_steps="last").rank_last_only(small)


def test_one_config_per_concern():
    assert ModelConfig.names() == ["num_items", "max_len", "hidden_size", "num_layers", "num_heads", "dropout",
                                   "attn_dropout", "decoder", "steps", "decoder_norm", "beta_1", "beta_T"]
    assert set(TrainConfig.names()) == {"loss", "cd_divergence", "negatives", "negative_sampling", "rank_steps", "lam",
                                        "temperature", "infonce_cosine",
                                        "diffusion", "denoising", "lr", "weight_decay", "batch_size", "seed",
                                        "valid_metric", "kcore"}
    assert set(RunConfig.names()) == {"epochs", "patience", "time_budget", "device", "threads", "eval_batch_size",
                                      "dist_timeout", "extra"}
    model_cfg, train_cfg, run_cfg = from_flat({"hidden_size": 8, "num_heads": 2, "lr": 0.01, "epochs": 3})
    assert (model_cfg.hidden_size, train_cfg.lr, run_cfg.epochs) == (8, 0.01, 3)
    with pytest.raises(ConfigError, match="unknown config keys: bogus"):
        from_flat({"bogus": 1})
    with pytest.raises(ConfigError, match="no field epochs"):
        model_cfg.replace(epochs=3)
    with pytest.raises(ConfigError, match="unknown ModelConfig keys: lr"):
        ModelConfig.from_dict({"lr": 0.1})
    # an earlier release's flat dict (model file version 1, graph metadata): each config picks its fields
    assert ModelConfig.pick({"hidden_size": 8, "num_heads": 2, "lr": 0.5, "num_threads": 3}).hidden_size == 8


def test_num_threads_is_an_old_name_of_threads(tmp_path):
    assert read_config_file(_yaml(tmp_path, "num_threads: 3\n")) == {"threads": 3}
    with pytest.raises(ConfigError, match="'num_threads' and 'threads'") as e:
        read_config_file(_yaml(tmp_path, "num_threads: 3\nthreads: 2\n"))
    assert "\n" not in str(e.value) and "c.yaml" in str(e.value)
    assert from_flat({"num_threads": 2})[2].threads == 2


def test_every_field_is_a_flag_of_cddrec_train():
    r = CliRunner().invoke(train_main, ["--help"], terminal_width=200)
    assert r.exit_code == 0
    for cls in (ModelConfig, TrainConfig, RunConfig):
        for name in cls.names():
            if name not in ("num_items", "extra"):
                assert f"--{name.replace('_', '-')}" in r.output, name
    assert "--num-threads" not in r.output  # the old spelling: accepted, not shown
    assert "0 = auto: the cores not already busy" in " ".join(r.output.split())


def test_threads_flag_and_its_old_spelling(tmp_path, tiny_data_file):
    from cddrec.app.options import max_threads

    base = [str(tiny_data_file), "--hidden-size", "8", "--num-heads", "2", "--max-len", "4", "--steps", "2",
            "--batch-size", "16", "--epochs", "1", "--quiet"]
    for flag in ("--threads", "--num-threads"):
        out = tmp_path / f"{flag}.pt"
        r = CliRunner().invoke(train_main, [*base, "-o", str(out), flag, "1"])
        assert r.exit_code == 0, r.output
        assert "with 1 CPU thread (--threads)" in r.output
        import torch

        assert torch.load(out, weights_only=True)["run_config"]["threads"] == 1
    r = CliRunner().invoke(train_main, [*base, "-o", str(tmp_path / "x.pt"), "--threads", str(max_threads() + 1)])
    assert r.exit_code == 2 and "--threads" in r.output
