"""retro-compile: sparse (Quest) + retrospective (RetroAttention) decode attention for PyTorch decoders.

    model = retro_compile(model)                   # a Hugging Face causal LM, ready for .generate()
    torch.compile(decoder, backend="retro")        # any module that calls SDPA
    rewrite_sdpa(gm, config, store)                # the pass alone, inside a backend of one's own
    rewrite_exported_program(ep, config)           # a torch.export program
"""

from .api import retro_compile
from .backend import retro_backend
from .config import RetroConfig
from .integrations.export import rewrite_exported_program
from .passes.rewrite import rewrite_sdpa
from .state import StateStore

__all__ = ["RetroConfig", "StateStore", "retro_backend", "retro_compile", "rewrite_exported_program", "rewrite_sdpa"]
__version__ = "0.1.0"
