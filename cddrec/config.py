"""The settings of a CDDRec run, one dataclass per concern (nanoGPT style).

- ``ModelConfig``: what the graph needs (sizes, decoder, schedule); a model is rebuilt from it alone.
- ``TrainConfig``: what else determines the trained weights (objective, optimiser, seed, model
  selection, the k-core filter); ``--resume`` refuses a run whose train or model config differs.
- ``RunConfig``: how this run executes and when it stops (epochs, patience, time budget, device,
  threads, evaluation batch); free to change between ``--resume`` calls.

A model file stores the three separately (``cddrec.checkpoint``). Field names are unique across the
three, so every field is also a command-line option of ``cddrec-train`` (``hidden_size`` ->
``--hidden-size``) and a key of a flat ``--config`` YAML or JSON file (``from_flat`` splits it).

Each field declares its type (the annotation) and its range or choices (``_f(..., min=, max=,
choices=)``) once: a config converts every value to the declared type and checks the range
(``coerce``), and ``cddrec-train``'s options are derived from the same declaration
(``click.IntRange`` / ``FloatRange`` / ``Choice``). A wrong value is a one-line ``ConfigError``
naming the field and what was expected. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _f(default, help: str = "", *, min: float | None = None, max: float | None = None, min_open: bool = False,
       max_open: bool = False, choices: tuple | None = None):
    """A config field: default, help, and its range ([min, max], open ends with min_open/max_open) or choices."""
    return field(default=default, metadata={"help": help, "min": min, "max": max, "min_open": min_open,
                                            "max_open": max_open, "choices": choices})


LOSSES = ("ce", "cd", "sampled", "auto")
PROPOSALS = ("popularity", "uniform")
DIVERGENCES = ("kl", "dot")
RANK_STEPS = ("auto", "all", "last")
DECODER_NORMS = ("pre", "rezero", "post")
VALID_METRICS = ("R@10", "N@10", "MRR", "MRR@40", "R@20", "N@20")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
SEED_MAX = 2**32 - 1  # numpy's seed range
# ``rank_steps: auto`` ranks at every step while N * T is at most this, else at the last step only.
# Measured (benchmarks/results/train_cost.md, one core, variants interleaved): the extra cost of
# ranking at every step is linear in n*N*(T-1) (~8.5e-9 s per target, item and step); the all-steps
# epoch costs 2.8x the last-step one on Office (N*T 48k), 3.1-3.9x at N*T ~97k (Office T=40, Beauty
# T=8) and 9.4x on Beauty (N*T 363k). Quality: all steps gained on Office (test R@10 0.1144, 3 seeds,
# vs 0.1091) and not on Beauty (0.0911 vs 0.0923). The threshold keeps the all-steps epoch within
# ~4x of the last-step one: Office ranks at every step, the three 12k-item catalogues at the last.
AUTO_RANK_MAX = 100_000
# ``loss: auto`` trains the full softmax (ce) below this many items and the sampled softmax (M = 2048) from
# it on. Measured (benchmarks/results/big_catalogue.md; one CPU thread, batch 128, paper-size model, runs
# interleaved) against the sampled softmax as auto trains it (ranked at every step, M*T <= AUTO_RANK_MAX):
# the same time per batch at 30k items (1.31 s against 1.35 s), 1.6-2.2x the time and 1.8x the memory at
# 100k, 6-8x the time and 3x the memory at 300k; at 1M the full softmax does not fit (one logit matrix of
# a batch is 5.4 GB, the loss holds three). Below 100k the exact objective costs about what the sampled
# one does, so it stays.
AUTO_SAMPLED_MIN_ITEMS = 100_000


class _Config:
    """What the three configs share: every value converted to its declared type and range-checked on
    construction (``coerce``), then the checks that involve more than one field (``validate``)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Checks that involve more than one field (each field's own type and range: ``coerce``)."""

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (checked like any construction)."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ConfigError(f"{type(self).__name__} has no field {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict):
        """The config of exactly these fields; an unknown key is a ``ConfigError`` naming it."""
        unknown = sorted(set(d) - set(cls.names()))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def pick(cls, flat: dict):
        """This config's fields out of a flat dict of any configs' fields (a version-1 model file, the
        metadata of a graph exported by an earlier release); other keys are ignored."""
        return cls(**{k: v for k, v in renamed(flat).items() if k in cls.names()})

    def differences(self, other) -> list[str]:
        """'field (X saved, Y now)' for every field whose value differs from ``other``'s (the saved config)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k} ({theirs[k]!r} saved, {mine[k]!r} now)" for k in mine if mine[k] != theirs[k]]


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config: {msg}")


@dataclass
class ModelConfig(_Config):
    """What the graph needs: a model is rebuilt from this config alone (and its weights)."""

    num_items: int = _f(0, "N, set from the data: item ids are 1..N, 0 pads, N+1 is the mask token", min=0)
    max_len: int = _f(20, "L, the most recent L items of a history are used", min=1)
    hidden_size: int = _f(128, "d, embedding and hidden size", min=1)
    num_layers: int = _f(1, "SASRec encoder blocks", min=1)
    num_heads: int = _f(4, "attention heads (encoder and decoder)", min=1)
    dropout: float = _f(0.3, "hidden dropout (released code: 0.0; 0.3 measured better on Office)",
                        min=0.0, max=1.0, max_open=True)
    attn_dropout: float = _f(0.2, "attention dropout (released code: 0.2)", min=0.0, max=1.0, max_open=True)
    decoder: bool = _f(True, "False: plain SASRec baseline (encoder output is the user embedding)")
    steps: int = _f(20, "T, denoising steps of the reverse chain", min=1)
    decoder_norm: str = _f("rezero", "pre: residual state update, LN on the query; rezero: gated, 0 at init; "
                           "post: LN after", choices=DECODER_NORMS)
    beta_1: float = _f(1e-4, "first beta of the linear noise schedule", min=0.0, max=1.0, min_open=True,
                       max_open=True)
    beta_T: float = _f(0.002, "last beta of the schedule (released code default; presets set it per dataset)",
                       min=0.0, max=1.0, min_open=True, max_open=True)

    def validate(self) -> None:
        _require(self.hidden_size % self.num_heads == 0,
                 f"hidden_size ({self.hidden_size}) must be a positive multiple of num_heads ({self.num_heads})")
        _require(self.beta_1 <= self.beta_T, f"need 0 < beta_1 <= beta_T < 1, got {self.beta_1}, {self.beta_T}")

    @property
    def num_rows(self) -> int:
        """V = N + 2 rows of the item table: padding 0, items 1..N, mask token N+1."""
        return self.num_items + 2

    @property
    def decoder_steps(self) -> int:
        """Denoising steps the model runs: T, or 0 for the plain SASRec baseline (no decoder)."""
        return self.steps if self.decoder else 0


@dataclass
class TrainConfig(_Config):
    """What determines the trained weights besides the model: objective, optimiser, seed, selection, data filter.

    ``--resume`` refuses a run whose ``TrainConfig`` (or ``ModelConfig``) differs from the saved one."""

    # ---- objective -------------------------------------------------------------------
    loss: str = _f("ce", "\"ce\": full-catalogue softmax; \"cd\": the paper's cross-divergence (Eq. 5); \"sampled\": "
                   "softmax over the target and --negatives shared sampled items, logQ-corrected; \"auto\": ce below "
                   f"{AUTO_SAMPLED_MIN_ITEMS:,} items, sampled from there on (measured rule)", choices=LOSSES)
    cd_divergence: str = _f("kl", "\"kl\": Gaussian KL of Eq. 5; \"dot\": released code's dot-product logit",
                            choices=DIVERGENCES)
    negatives: int = _f(2048, "M of --loss sampled: items drawn per batch (with replacement), shared by its targets",
                        min=1)
    negative_sampling: str = _f("popularity", "proposal of --loss sampled: popularity (training count + 1) or "
                                "uniform; the logits are corrected by log Q either way", choices=PROPOSALS)
    rank_steps: str = _f("auto", "steps with the ranking term (ce or cd): all T, only the last (InfoNCE at all), "
                         f"or auto: all while N*T <= {AUTO_RANK_MAX:,}, else last (measured cost rule)",
                         choices=RANK_STEPS)
    lam: float = _f(0.0, "lambda of Eq. 8 on the InfoNCE terms (released code: 0.3; 0 measured as good, 3x faster)",
                    min=0.0)
    temperature: float = _f(0.5, "tau of the InfoNCE terms (Eq. 6, 7)", min=0.0, min_open=True)
    infonce_cosine: bool = _f(True, "cosine similarity in InfoNCE (released code); False: raw dot (Eq. 6)")
    diffusion: bool = _f(True, "ablation \"-Diffusion\": False uses clean target embeddings")
    denoising: bool = _f(False, "sample x_hat_t by Eq. 4 in training (False = Table 3 \"-Denoising\", measured better)")
    # ---- optimiser -------------------------------------------------------------------
    lr: float = _f(1e-3, "Adam learning rate", min=0.0, min_open=True)
    weight_decay: float = _f(0.0, "Adam weight decay", min=0.0)
    batch_size: int = _f(128, "training windows per batch, per process under torchrun (the global batch is this x "
                         "the processes; >= 2: InfoNCE needs in-batch negatives)", min=2)
    # ---- seed, model selection, data ---------------------------------------------------
    seed: int = _f(42, "random seed (batches, negatives, augmentation, init)", min=0, max=SEED_MAX)
    valid_metric: str = _f("N@10", "validation metric for early stopping and model selection", choices=VALID_METRICS)
    kcore: int = _f(5, "k-core filter applied to interaction logs (users and items with >= k)", min=1)

    def rank_last_only(self, model: ModelConfig) -> bool:
        """Whether the ranking term is applied at the last step only (``rank_steps``, ``auto`` resolved by the
        columns of a ranking logit row times T: N items, or M negatives of the sampled softmax)."""
        if self.rank_steps == "auto":
            columns = min(model.num_items, self.negatives) if self.resolve_loss(model)[0] == "sampled" else \
                model.num_items
            return columns * model.steps > AUTO_RANK_MAX
        return self.rank_steps == "last"

    def resolve_loss(self, model: ModelConfig) -> tuple[str, str]:
        """The objective trained (``loss``, with ``auto`` resolved by the catalogue size) and why, in words."""
        n = model.num_items
        if self.loss != "auto":
            return self.loss, f"--loss {self.loss}"
        if n >= AUTO_SAMPLED_MIN_ITEMS:
            return "sampled", f"--loss auto: {n:,} items >= {AUTO_SAMPLED_MIN_ITEMS:,}"
        return "ce", f"--loss auto: {n:,} items < {AUTO_SAMPLED_MIN_ITEMS:,}"


@dataclass
class RunConfig(_Config):
    """How this run executes and when it stops: free to change between ``--resume`` calls."""

    epochs: int = _f(200, "maximum training epochs", min=1)
    patience: int = _f(10, "epochs without validation improvement before stopping", min=1)
    time_budget: float = _f(0.0, "minutes of training; 0 = no limit", min=0.0)
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    threads: int = _f(0, "CPU threads; 0 = auto: the cores not already busy (CPU affinity minus the 1-minute "
                      "load average, at least 1)", min=0)
    eval_batch_size: int = _f(512, "users per evaluation batch", min=1)
    dist_timeout: float = _f(30.0, "minutes a process of a torchrun job waits for the others (a dead or stuck rank) "
                             "before the job stops with an error", min=0.0, min_open=True)
    extra: dict = field(default_factory=dict, metadata={"help": "free-form notes carried into the checkpoint"})


CONFIGS = (ModelConfig, TrainConfig, RunConfig)
# spellings of earlier releases, accepted in config files and version-1 model files for one release
OLD_NAMES = {"num_threads": "threads"}


def renamed(values: dict) -> dict:
    """``values`` with old field names (``OLD_NAMES``) under their new names; both at once is an error."""
    out = dict(values)
    for old, new in OLD_NAMES.items():
        if old in out:
            if new in out:
                raise ConfigError(f"config keys {old!r} and {new!r} are the same field ({old!r} is its old name): "
                                  f"give {new!r} only")
            out[new] = out.pop(old)
    return out


def from_flat(values: dict) -> tuple[ModelConfig, TrainConfig, RunConfig]:
    """Flat field values (defaults <- preset <- --config file <- flags, or a version-1 model file's
    ``config``) split into the three configs; an unknown key is a ``ConfigError`` naming it."""
    values = renamed(values)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    return tuple(cls(**{k: v for k, v in values.items() if k in cls.names()}) for cls in CONFIGS)  # type: ignore


def to_flat(*configs: _Config) -> dict[str, Any]:
    """The flat dict of several configs' fields (the inverse of ``from_flat``: results files, summaries)."""
    out: dict[str, Any] = {}
    for c in configs:
        out.update(c.to_dict())
    return out


FIELDS: dict[str, Field] = {f.name: f for cls in CONFIGS for f in fields(cls)}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def field_type(name: str) -> type:
    """The declared type of a config field: int, float, bool, str or dict."""
    return {"int": int, "float": float, "bool": bool, "str": str, "dict": dict}[str(FIELDS[name].type)]


def expected(name: str) -> str:
    """What a field accepts, in words: 'an integer >= 1', 'a number in (0, 1)', 'one of ...'."""
    meta, kind = FIELDS[name].metadata, field_type(name)
    if meta.get("choices"):
        return "one of " + ", ".join(meta["choices"])
    if kind is bool:
        return "true or false"
    if kind is dict:
        return "a mapping"
    if name == "device":
        return "auto, cpu, cuda or cuda:N"
    what = "an integer" if kind is int else "a number" if kind is float else "a string"
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"{what} in {'(' if meta['min_open'] else '['}{lo:g}, {hi}{')' if meta['max_open'] else ']'}"
    if lo is not None:
        return f"{what} {'>' if meta['min_open'] else '>='} {lo:g}"
    if hi is not None:
        return f"{what} {'<' if meta['max_open'] else '<='} {hi}"
    return what


def coerce(name: str, value: Any) -> Any:
    """``value`` converted to field ``name``'s declared type and checked against its range or choices.

    YAML reads ``1e-3`` as a string and quoted numbers are strings: numeric strings convert;
    integral floats (16.0) are integers, 16.5 is not; booleans accept true/false/yes/no/on/off/1/0.
    """
    if name not in FIELDS:
        raise ConfigError(f"unknown config key {name!r}")
    kind, meta = field_type(name), FIELDS[name].metadata

    def bad() -> ConfigError:
        return ConfigError(f"config field {name!r}: expected {expected(name)}, got {value!r}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad()
    if kind is dict:
        if not isinstance(value, dict):
            raise bad()
        return value
    if kind is str:
        if not isinstance(value, str):
            raise bad()
        if meta.get("choices") and value not in meta["choices"]:
            raise bad()
        if name == "device" and not DEVICE_PATTERN.fullmatch(value):
            raise bad()
        return value
    # numbers
    if value is None or isinstance(value, bool):
        raise bad()
    if isinstance(value, str):
        try:
            value_num = float(value.strip()) if kind is float else _int_text(value)
        except ValueError:
            raise bad() from None
    elif isinstance(value, (int, float)):
        value_num = value
    else:
        raise bad()
    if kind is int:
        if isinstance(value_num, float):
            if not (math.isfinite(value_num) and value_num.is_integer()):
                raise bad()
            value_num = int(value_num)
    else:
        value_num = float(value_num)
        if not math.isfinite(value_num):
            raise bad()
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value_num < lo or (meta["min_open"] and value_num == lo)):
        raise bad()
    if hi is not None and (value_num > hi or (meta["max_open"] and value_num == hi)):
        raise bad()
    return value_num


def _int_text(text: str) -> int | float:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return float(text)  # "16.0" -> 16.0, checked as integral by the caller


def field_names() -> list[str]:
    return list(FIELDS)


# Per-dataset settings from the paper's released commands (issue 2), keyed by file stem.
PRESETS: dict[str, dict[str, Any]] = {
    "Office_Products": {"beta_T": 0.04},
    "Beauty": {"steps": 30},
    "Tools_and_Home_Improvement": {"beta_T": 0.08},
    "Toys_and_Games": {"steps": 25},
}


def preset_for(data_path: str | Path) -> dict[str, Any]:
    return dict(PRESETS.get(Path(data_path).stem, {}))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read config overrides from a YAML (.yaml/.yml) or JSON file of flat field keys (of any of the three
    configs), each value converted to its field's type; old names (``num_threads``) are read as the new ones."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - pyyaml is a core dependency
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}: not valid JSON: {e.msg}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    try:
        data = renamed({str(k).replace("-", "_"): v for k, v in data.items()})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        raise ConfigError(f"{path}: unknown config keys: {', '.join(unknown)}")
    out = {}
    for k, v in data.items():
        try:
            out[k] = coerce(k, v)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return out


def click_type(name: str):
    """The click parameter type of a config field, from its declaration (range, choices)."""
    import click

    kind, meta = field_type(name), FIELDS[name].metadata
    if meta.get("choices"):
        return click.Choice(list(meta["choices"]))
    if kind in (int, float):
        rng = click.IntRange if kind is int else click.FloatRange
        return rng(meta.get("min"), meta.get("max"), min_open=meta.get("min_open", False),
                   max_open=meta.get("max_open", False))
    return kind


def default_of(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default
