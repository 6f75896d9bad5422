"""One dataclass holds every setting of a CDDRec run: data, model, objective, training.

A checkpoint stores ``asdict(config)``; a model is rebuilt from that dict alone.
Every field is also a command-line option of ``cddrec-train`` (``hidden_size`` ->
``--hidden-size``) and a key of a ``--config`` YAML or JSON file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


def _f(default, help: str = ""):
    return field(default=default, metadata={"help": help})


LOSSES = ("ce", "cd")
DIVERGENCES = ("kl", "dot")
RANK_STEPS = ("all", "last")
DECODER_NORMS = ("pre", "rezero", "post")
VALID_METRICS = ("R@10", "N@10", "MRR", "MRR@40", "R@20", "N@20")


@dataclass
class CDDRecConfig:
    # ---- data ------------------------------------------------------------------------
    num_items: int = _f(0, "N, set from the data: item ids are 1..N, 0 pads, N+1 is the mask token")
    max_len: int = _f(20, "L, the most recent L items of a history are used")
    kcore: int = _f(5, "k-core filter applied to interaction logs (users and items with >= k)")
    # ---- model -----------------------------------------------------------------------
    hidden_size: int = _f(128, "d, embedding and hidden size")
    num_layers: int = _f(1, "SASRec encoder blocks")
    num_heads: int = _f(4, "attention heads (encoder and decoder)")
    dropout: float = _f(0.3, "hidden dropout (released code: 0.0; 0.3 measured better on Office)")
    attn_dropout: float = _f(0.2, "attention dropout (released code: 0.2)")
    decoder: bool = _f(True, "False: plain SASRec baseline (encoder output is the user embedding)")
    steps: int = _f(20, "T, denoising steps of the reverse chain")
    decoder_norm: str = _f("rezero", "pre: residual state update, LN on the query; rezero: gated, 0 at init; post: LN after")
    beta_1: float = _f(1e-4, "first beta of the linear noise schedule")
    beta_T: float = _f(0.002, "last beta of the schedule (released code default; presets set it per dataset)")
    # ---- objective -------------------------------------------------------------------
    loss: str = _f("ce", "\"ce\": full-catalogue softmax; \"cd\": the paper's cross-divergence (Eq. 5)")
    cd_divergence: str = _f("kl", "\"kl\": Gaussian KL of Eq. 5; \"dot\": released code's dot-product logit")
    rank_steps: str = _f("all", "steps with the ranking term (ce or cd): all T, or only the last (InfoNCE at all)")
    lam: float = _f(0.0, "lambda of Eq. 8 on the InfoNCE terms (released code: 0.3; 0 measured as good, 3x faster)")
    temperature: float = _f(0.5, "tau of the InfoNCE terms (Eq. 6, 7)")
    infonce_cosine: bool = _f(True, "cosine similarity in InfoNCE (released code); False: raw dot (Eq. 6)")
    diffusion: bool = _f(True, "ablation \"-Diffusion\": False uses clean target embeddings")
    denoising: bool = _f(False, "sample x_hat_t by Eq. 4 in training (False = Table 3 \"-Denoising\", measured better)")
    # ---- training --------------------------------------------------------------------
    epochs: int = _f(200, "maximum training epochs")
    batch_size: int = _f(128, "training windows per batch")
    lr: float = _f(1e-3, "Adam learning rate")
    weight_decay: float = _f(0.0, "Adam weight decay")
    patience: int = _f(10, "epochs without validation improvement before stopping")
    valid_metric: str = _f("N@10", "validation metric for early stopping and model selection")
    time_budget: float = _f(0.0, "minutes of training; 0 = no limit")
    seed: int = _f(42, "random seed (batches, negatives, augmentation, init)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    num_threads: int = _f(0, "CPU threads; 0 = all cores")
    eval_batch_size: int = _f(512, "users per evaluation batch")
    extra: dict = field(default_factory=dict, metadata={"help": "free-form notes carried into the checkpoint"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid config: {msg}")

        need(self.hidden_size > 0 and self.hidden_size % self.num_heads == 0,
             f"hidden_size ({self.hidden_size}) must be a positive multiple of num_heads ({self.num_heads})")
        need(self.max_len >= 1, "max_len must be >= 1")
        need(self.steps >= 1, "steps (T) must be >= 1")
        need(0.0 < self.beta_1 <= self.beta_T < 1.0, f"need 0 < beta_1 <= beta_T < 1, got {self.beta_1}, {self.beta_T}")
        need(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        need(self.decoder_norm in DECODER_NORMS, f"decoder_norm must be one of {DECODER_NORMS}, got {self.decoder_norm!r}")
        need(self.cd_divergence in DIVERGENCES, f"cd_divergence must be one of {DIVERGENCES}")
        need(self.rank_steps in RANK_STEPS, f"rank_steps must be one of {RANK_STEPS}")
        need(self.valid_metric in VALID_METRICS, f"valid_metric must be one of {VALID_METRICS}")
        need(self.temperature > 0, "temperature must be > 0")
        need(self.batch_size >= 2, "batch_size must be >= 2 (InfoNCE needs in-batch negatives)")
        need(self.num_items >= 0, "num_items must be >= 0")

    @property
    def num_rows(self) -> int:
        """V = N + 2 rows of the item table: padding 0, items 1..N, mask token N+1."""
        return self.num_items + 2

    @property
    def mask_id(self) -> int:
        return self.num_items + 1

    @property
    def decoder_steps(self) -> int:
        """Denoising steps the model runs: T, or 0 for the plain SASRec baseline (no decoder)."""
        return self.steps if self.decoder else 0

    def replace(self, **changes: Any) -> "CDDRecConfig":
        d = asdict(self)
        d.update(changes)
        return CDDRecConfig(**d)

    @classmethod
    def from_dict(cls, d: dict) -> "CDDRecConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)


def field_names() -> list[str]:
    return [f.name for f in fields(CDDRecConfig)]


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
    """Read config overrides from a YAML (.yaml/.yml) or JSON file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - pyyaml is a core dependency
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: not valid JSON: {e.msg}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        raise ValueError(f"{path}: unknown config keys: {', '.join(unknown)}")
    return data
