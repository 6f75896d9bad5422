"""Model files: data, not code.

A model file is a plain dict saved with ``torch.save`` and read with
``torch.load(..., weights_only=True)``::

    {"format": "cddrec", "format_version": 2,
     "model_config": asdict(ModelConfig),   # what the graph needs: the model is rebuilt from it alone
     "train_config": asdict(TrainConfig),   # objective, optimiser, seed, selection metric, k-core
     "run_config": asdict(RunConfig),       # epochs, patience, budget, device, threads of the run that wrote it
     "model": state_dict,
     "vocab": {"keys": [...], "key_type": "int"|"str"},
     "popularity": LongTensor (V,)  # training interaction counts, the cold-start fallback
     "best_valid": {...}, "best_epoch": int, "data": {"fingerprint", "source", "stats"},
     "history": [...], "created": str}

Version 1 (cddrec 0.2.0) stored the three configs as one flat ``"config"`` dict; ``read_checkpoint``
still reads it, splitting that dict into the three (``upgrade``), so existing model files load,
export and serve.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import pickle
import zipfile
from pathlib import Path

import torch

from .config import ModelConfig, RunConfig, TrainConfig, from_flat
from .errors import CheckpointError, ConfigError
from .io import atomic_open
from .model import CDDRec
from .vocab import Vocab

# what torch.load raises on a file that is not a (safe) model file
UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError)
FORMAT = "cddrec"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: one flat "config" dict, split on reading


def save_checkpoint(path: str | Path, model: CDDRec, vocab: Vocab, popularity: torch.Tensor,
                    train_cfg: TrainConfig | None = None, run_cfg: RunConfig | None = None, **meta) -> None:
    """Write a model file atomically (temporary file, then rename). The model config is the model's own;
    ``train_cfg`` and ``run_cfg`` default to the defaults (a model not trained by ``train``: random weights)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": model.cfg.to_dict(),
        "train_config": (train_cfg or TrainConfig()).to_dict(),
        "run_config": (run_cfg or RunConfig()).to_dict(),
        "model": state,
        "vocab": vocab.to_dict(),
        "popularity": torch.as_tensor(popularity, dtype=torch.int64).cpu(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **meta,
    }
    save_torch(path, ckpt)


def save_torch(path: str | Path, obj) -> None:
    """``torch.save`` atomically; serialized in memory and written by Python, so a failed write
    (disk full, file-size limit) is an ``OutputError`` naming the file, not a torch RuntimeError."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_open(path, "wb") as f:
        f.write(buf.getbuffer())


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, checked for format and version; clear errors otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a model file (model.pt)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), expected a model file saved by cddrec-train")
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(f"{path}: an exported graph, not a model file (model.pt): give this command the "
                              "model.pt it was exported from (the graph is served by cddrec-infer and cddrec-serve "
                              "with --backend ort-cpu or ort-cuda)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():  # a class or function, not garbage bytes
            raise CheckpointError(f"{path}: refused: the file contains Python objects beyond tensors and plain "
                                  "data; cddrec model files never do; it may be unsafe") from None
        raise CheckpointError(f"{path}: not a readable model file (corrupt, truncated, or not saved by "
                              "cddrec-train)") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises IndexError, KeyError, ... on arbitrary bytes
        raise CheckpointError(f"{path}: not a readable model file (corrupt, truncated, or not saved by "
                              f"cddrec-train; {type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cddrec model file (no 'format': 'cddrec' entry)")
    version = ckpt.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: model file format version {version}, this cddrec reads "
                              f"versions {', '.join(map(str, READABLE_VERSIONS))}; retrain or use a matching cddrec")
    for key in ("config" if version == 1 else "model_config", "model", "vocab"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: model file has no {key!r} entry")
    if version == 1:
        try:
            return upgrade(ckpt)
        except (ConfigError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: a version-1 model file with an unreadable 'config': {e}") from None
    return ckpt


def upgrade(ckpt: dict) -> dict:
    """A version-1 model file's dict with its flat ``config`` split into ``model_config``,
    ``train_config`` and ``run_config`` (values checked); ``format_version`` stays 1 (what was read)."""
    out = {k: v for k, v in ckpt.items() if k != "config"}
    model_cfg, train_cfg, run_cfg = from_flat(ckpt["config"])
    out.update(model_config=model_cfg.to_dict(), train_config=train_cfg.to_dict(), run_config=run_cfg.to_dict())
    return out


def model_from_checkpoint(ckpt: dict) -> CDDRec:
    model = CDDRec(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model


def load_checkpoint(path: str | Path) -> tuple[CDDRec, dict]:
    """(model in eval mode on CPU, checkpoint dict) from a model file."""
    ckpt = read_checkpoint(path)
    try:
        model = model_from_checkpoint(ckpt)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: weights do not match the stored config: {e}") from e
    return model, ckpt


def weights_checksum(model: CDDRec) -> str:
    """sha256 over the parameter names and bytes (identifies exported weights)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
