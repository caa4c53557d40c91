"""int8 (torchao): the chosen linear layers become int8, the folder holds int8 tensors and no float copy of them,
and a reload reproduces the quantized model exactly; bad folders fail with a clear message."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_student import outputs, training_batch, write_student_folder
from torchao.utils import TorchAOBaseTensor

from common.sizes import weight_bytes
from prune.int8 import MARKER, WEIGHTS, linear_names, load_int8_folder, quantize_modules
from prune.quantize import main as quantize_main
from student.build import load_student_folder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_student_folder(tmp_path_factory.mktemp("int8"))


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic"])
def test_int8_round_trip(folder, tmp_path, scheme):
    out = tmp_path / "int8"
    assert quantize_main([f"model={folder}", f"output_dir={out}", f"scheme={scheme}"]) == 0
    info = json.loads((out / "model" / MARKER).read_text())
    assert info["scheme"] == scheme and info["aliases"]["llm.lm_head.weight"] == "llm.model.embed_tokens.weight"
    model = load_student_folder(folder)
    names = linear_names(model, ["llm", "speech_encoder", "audio_encoder"], ["lm_head"])
    assert info["modules"] == names
    assert "llm.lm_head" not in names and "llm.model.layers.0.mlp.down_proj" in names
    assert "speech_encoder.layers.1.fc2" in names and "audio_encoder.encoder.layers.0.fc1" in names
    assert not any(n.startswith(("qformer", "projector")) for n in names)
    fp_bytes = weight_bytes(model, model.parts())["total"]
    quantize_modules(model, names, scheme)

    again = load_int8_folder(out / "model")
    for name in names:
        weight = again.get_submodule(name).weight
        assert isinstance(weight, TorchAOBaseTensor) and weight.qdata.dtype == torch.int8, name
    assert again.llm.lm_head.weight is again.llm.model.embed_tokens.weight  # the tie survives, in float
    assert type(again.llm.lm_head.weight.data) is torch.Tensor
    batch = training_batch(again)
    for reloaded, quantized in zip(outputs(again, batch), outputs(model, batch), strict=True):
        assert torch.equal(reloaded, quantized)
    fp = load_student_folder(folder)
    assert (outputs(fp, batch)[1] - outputs(again, batch)[1]).abs().max() > 0  # int8 really changed the weights
    assert weight_bytes(again, again.parts())["total"] < 0.75 * fp_bytes
    with safe_open(str(out / "model" / WEIGHTS), "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("llm.model.layers.0.mlp.down_proj._weight_qdata").dtype == torch.int8
    assert "llm.model.layers.0.mlp.down_proj.weight" not in keys  # no float copy of a quantized weight
    assert not (out / "model" / "llm" / "model.safetensors").exists()


def test_int8_loader_names_what_is_wrong(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=MARKER):
        load_int8_folder(folder)
    with pytest.raises(SystemExit, match="parts"):
        quantize_main([f"model={folder}", f"output_dir={tmp_path / 'bad'}", "parts=[llm, decoder]"])
    with pytest.raises(SystemExit, match="not a student folder"):
        quantize_main([f"model={tmp_path}", f"output_dir={tmp_path / 'bad2'}"])
