"""``retro-compile serve``: transformers' OpenAI-compatible server (``transformers serve``) with
continuous batching, every model it loads ``retro_compile``d.

    retro-compile serve Qwen/Qwen2.5-Coder-0.5B-Instruct --budget 2048 --max-context 32768

The server is transformers' own (its endpoints, request handling and continuous batching
manager); only its model loader differs: each model it loads goes through ``retro_compile`` with
the given :class:`~retro_compile.RetroConfig` before the first request, and the continuous
batching it runs is then this package's (:mod:`retro_compile.integrations.hf.serving`). Needs
transformers' serving dependencies: ``pip install "retro-compile[serve]"``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from .config import RetroConfig

log = logging.getLogger(__name__)


def server(model: str | None, config: RetroConfig, *, background: bool = False, **options: Any) -> Any:
    """transformers' ``Serve`` over a model loader that ``retro_compile``s each model with
    ``config``; continuous batching on. ``model`` is preloaded (None: models load on their first
    request, by the name it gives). ``options`` are ``transformers serve``'s own (``host``,
    ``port``, ``device``, ``dtype``, ``cb_num_blocks``, ...). With ``background`` the server runs
    in a thread and the call returns; ``kill_server()`` stops it. Otherwise the call serves until
    interrupted."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ImportError('retro-compile serve needs transformers\' serving dependencies: pip install "retro-compile[serve]"')
    from transformers.cli import serve as serve_module
    from transformers.cli.serving import model_manager

    from . import retro_compile

    class RetroModelManager(model_manager.ModelManager):
        """transformers' model manager, with each model it loads ``retro_compile``d."""

        def _load_model(self, *args: Any, **kwargs: Any) -> Any:
            loaded = super()._load_model(*args, **kwargs)
            log.info("retro-compile serve: %s loaded; retro_compile with %s", type(loaded).__name__, config)
            return retro_compile(loaded, config)

    stock = model_manager.ModelManager
    model_manager.ModelManager = RetroModelManager  # what Serve imports when it builds its manager
    try:
        return serve_module.Serve(force_model=model, continuous_batching=True, non_blocking=background, **options)
    finally:
        model_manager.ModelManager = stock


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="retro-compile serve",
                                description="transformers' OpenAI-compatible server (transformers serve) with continuous "
                                            "batching, every model it loads retro_compile'd; needs the serve extra")
    p.add_argument("model", nargs="?", help="model to preload (a model id or a local folder); without it, models load "
                                            "on their first request")
    p.add_argument("--mode", choices=("dense", "quest", "retro"), default=RetroConfig.mode, help="RetroConfig.mode")
    p.add_argument("--budget", type=float, default=RetroConfig.budget,
                   help="tokens a query reads (a whole number), or a fraction of the context (below 1)")
    p.add_argument("--window", type=int, default=None, help="decode rows per step (default: the mode's)")
    p.add_argument("--page-size", type=int, default=RetroConfig.page_size, help="positions per page")
    p.add_argument("--dense-layers", type=int, default=RetroConfig.dense_layers, help="the first n layers stay dense")
    p.add_argument("--max-context", type=int, default=RetroConfig.max_context,
                   help="the longest request (prompt plus max_tokens) served")
    p.add_argument("--summaries", choices=("exact", "int8"), default=RetroConfig.summaries, help="RetroConfig.summaries")
    p.add_argument("--host", default="localhost", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--device", default="auto", help="device for inference (auto, cuda:0, cpu)")
    p.add_argument("--dtype", default="auto", help="model dtype (auto: from the weights)")
    p.add_argument("--cb-num-blocks", type=int, default=None, help="blocks of the paged cache (default: sized to memory)")
    p.add_argument("--cb-max-batch-tokens", type=int, default=None, help="most tokens a forward call takes")
    p.add_argument("--log-level", default="warning", help="transformers' logging level")
    return p.parse_args(argv)


def config_of(args: argparse.Namespace) -> RetroConfig:
    budget = int(args.budget) if args.budget >= 1 else args.budget
    return RetroConfig(mode=args.mode, budget=budget, window=args.window, page_size=args.page_size,
                       dense_layers=args.dense_layers, max_context=args.max_context, summaries=args.summaries)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server(args.model, config_of(args), host=args.host, port=args.port, device=args.device, dtype=args.dtype,
           cb_num_blocks=args.cb_num_blocks, cb_max_batch_tokens=args.cb_max_batch_tokens, log_level=args.log_level)


if __name__ == "__main__":
    main()
