"""cddrec: train CDDRec (conditional denoising diffusion for sequential recommendation) and serve it fast."""

__version__ = "0.1.0"

from .config import CDDRecConfig  # noqa: E402
from .model import CDDRec  # noqa: E402

__all__ = ["CDDRecConfig", "CDDRec", "__version__"]
