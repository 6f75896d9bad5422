"""cddrec: train CDDRec (conditional denoising diffusion for sequential recommendation) and serve it fast.

Importing ``cddrec`` loads nothing heavy: serving (``cddrec.runtime``) runs without PyTorch.
``cddrec.ModelConfig``, ``cddrec.TrainConfig``, ``cddrec.RunConfig`` and ``cddrec.CDDRec`` are loaded
on first use.
"""

__version__ = "0.2.0"

__all__ = ["ModelConfig", "TrainConfig", "RunConfig", "CDDRec", "__version__"]


def __getattr__(name: str):
    if name in ("ModelConfig", "TrainConfig", "RunConfig"):
        from . import config

        return getattr(config, name)
    if name == "CDDRec":
        from .model import CDDRec

        return CDDRec
    raise AttributeError(f"module 'cddrec' has no attribute {name!r}")
