"""retro-compile: sparse (Quest) + retrospective (RetroAttention) decode attention for PyTorch decoders."""

from .config import RetroConfig
from .kernels import op as _op  # noqa: F401  (registers retro::attention)

__all__ = ["RetroConfig"]
__version__ = "0.1.0"
