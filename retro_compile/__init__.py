"""retro-compile: sparse (Quest) + retrospective (RetroAttention) decode attention for PyTorch decoders.

    model = retro_compile(model)                   # a Hugging Face causal LM, ready for .generate()
    torch.compile(decoder, backend="retro")        # any module that calls SDPA
"""

from .api import retro_compile
from .backend import retro_backend
from .config import RetroConfig

__all__ = ["RetroConfig", "retro_backend", "retro_compile"]
__version__ = "0.1.0"
