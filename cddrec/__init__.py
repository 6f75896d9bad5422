"""cddrec: train CDDRec (conditional denoising diffusion for sequential recommendation) and serve it fast.

Importing ``cddrec`` loads nothing heavy: serving (``cddrec.runtime``) runs without PyTorch.
``cddrec.CDDRecConfig`` and ``cddrec.CDDRec`` are loaded on first use.
"""

__version__ = "0.2.0"

__all__ = ["CDDRecConfig", "CDDRec", "__version__"]


def __getattr__(name: str):
    if name == "CDDRecConfig":
        from .config import CDDRecConfig

        return CDDRecConfig
    if name == "CDDRec":
        from .model import CDDRec

        return CDDRec
    raise AttributeError(f"module 'cddrec' has no attribute {name!r}")
