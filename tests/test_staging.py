"""Exports are written in full or not at all, with the modes the user's umask gives."""

import os
import stat

import numpy as np
import pytest
from safetensors.numpy import save_file

from jlora.staging import staged


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize(("mask", "folder", "file"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_a_staged_folder_has_the_umask_modes(tmp_path, umask, mask, folder, file):
    umask(mask)
    with staged(tmp_path / "export") as staging:
        save_file({"w": np.zeros(3, np.float32)}, staging / "adapter_model.safetensors")  # safetensors writes 0600
        (staging / "sub").mkdir()
        (staging / "sub" / "config.json").write_text("{}")
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)
    assert mode(tmp_path / "export") == mode(tmp_path / "export" / "sub") == folder
    assert mode(tmp_path / "export" / "adapter_model.safetensors") == mode(tmp_path / "export" / "sub" / "config.json")
    assert mode(tmp_path / "export" / "adapter_model.safetensors") == file


def test_a_failure_leaves_nothing_and_an_existing_folder_is_refused(tmp_path):
    with pytest.raises(RuntimeError), staged(tmp_path / "export") as staging:
        (staging / "half.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "export").mkdir()
    with pytest.raises(FileExistsError, match="exists; choose a new folder"), staged(tmp_path / "export"):
        pass
