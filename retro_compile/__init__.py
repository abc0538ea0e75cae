"""retro-compile: sparse (Quest) + retrospective (RetroAttention) decode attention for PyTorch decoders.

    model = retro_compile(model)                   # a Hugging Face causal LM, ready for .generate()
    torch.compile(decoder, backend="retro")        # any module that calls SDPA
"""

from .backend import retro_backend
from .config import RetroConfig
from .kernels import op as _op  # noqa: F401  (registers retro::attention)

__all__ = ["RetroConfig", "retro_backend"]
__version__ = "0.1.0"

from .api import retro_compile  # noqa: E402

__all__ += ["retro_compile"]
