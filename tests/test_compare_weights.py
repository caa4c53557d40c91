"""`python -m common.compare_weights`: identical folders pass, one changed value or a missing tensor fails."""

import shutil

import pytest
import torch
from safetensors.torch import save_file

from common.compare_weights import compare, main


def write_folder(root, scale=1.0):
    (root / "llm").mkdir(parents=True)
    save_file({"w": torch.arange(6.0).reshape(2, 3) * scale}, str(root / "llm" / "model.safetensors"))
    torch.save({"cfg": {"x": 1}, "model": {"a": torch.ones(4), "b": torch.zeros(2)}}, root / "beats.pt")
    return root


def test_identical_folders_are_the_same_weights(tmp_path, capsys):
    a = write_folder(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert main([str(a), str(b)]) == 0
    assert "3 tensors, 12 values in both; differing tensors: 0" in capsys.readouterr().out


def test_one_changed_value_or_a_missing_tensor_fails(tmp_path):
    a = write_folder(tmp_path / "a")
    b = write_folder(tmp_path / "b", scale=2.0)
    assert compare(a, b)["differing"] == ["llm/model.safetensors:w"] and main([str(a), str(b)]) == 1
    torch.save({"model": {"a": torch.ones(4)}}, b / "beats.pt")
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(b / "llm" / "model.safetensors"))
    assert compare(a, b)["only_in_a"] == ["beats.pt:b"] and main([str(a), str(b)]) == 1
    with pytest.raises(SystemExit, match="is not a folder"):
        main([str(a), str(tmp_path / "nope")])
