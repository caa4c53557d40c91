"""common.device: where inference jobs put their models, and in which dtype."""

import pytest
import torch
from torch import nn

from common.device import is_quantized, place_for_inference, resolve_device, resolve_dtype


def test_auto_is_the_cpu_in_float32_without_a_gpu():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    else:
        assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


@pytest.mark.parametrize(("name", "message"), [("meta", "only cpu and cuda"), ("gpu0", "is not a device")])
def test_bad_device_names_say_what_to_use(name, message):
    with pytest.raises(SystemExit, match=message):
        resolve_device(name, "evaluate.device")


def test_bad_dtype_names_the_key():
    with pytest.raises(SystemExit, match="evaluate.dtype='half'; use auto, float32, float16 or bfloat16"):
        resolve_dtype("half", torch.device("cpu"), "evaluate.dtype")


def test_place_casts_floating_weights_and_keeps_integer_buffers():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model.register_buffer("steps", torch.arange(3))
    model.train()
    placed = place_for_inference(model, "cpu", "float16")
    assert not placed.training
    assert {p.dtype for p in placed.parameters()} == {torch.float16}
    assert placed.steps.dtype == torch.int64
    assert not is_quantized(placed)


def test_int8_weights_only_move():
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = nn.Sequential(nn.Linear(32, 16))
    quantize_(model, Int8WeightOnlyConfig())
    assert is_quantized(model)
    before = model[0].weight.dequantize().clone()
    placed = place_for_inference(model, "cpu", "float16")
    assert torch.equal(placed[0].weight.dequantize(), before)
    assert torchao is not None


def test_an_int8_model_computes_in_the_placement_dtype():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.LayerNorm(16), nn.Linear(16, 8))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn == "0")
    placed = place_for_inference(model, "cpu", "float16")
    assert placed[0].weight.qdata.dtype == torch.int8  # the int8 weight only moved
    assert {p.dtype for p in (placed[0].bias, placed[1].weight, placed[2].weight)} == {torch.float16}
    with torch.no_grad():
        assert placed(torch.randn(2, 32, dtype=torch.float16)).dtype == torch.float16
