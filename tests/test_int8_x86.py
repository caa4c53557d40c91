"""int8 for the CPU (scheme int8_dynamic_x86, FBGEMM): one layer against the float layer within the error bound its
quantization allows; the tiny student's round trip (no float copy of a quantized weight, exact reload, outputs close
to float32); clear errors off x86 and on a GPU input."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from tiny_student import outputs, training_batch, write_student_folder
from torch import nn
from torch.nn import functional as F

import common.int8_x86 as int8_x86
from common.int8_x86 import X86DynamicLinear
from common.results import load_results
from common.sizes import count_parameters, weight_bytes
from evaluation.analytic import counted_flops, llm_shape
from evaluation.run import main as evaluate_main
from prune.int8 import MARKER, WEIGHTS, linear_names, load_int8_folder, quantize_modules
from prune.quantize import main as quantize_main
from student.build import load_student_folder

torch.set_num_threads(1)


def test_layer_matches_float_within_its_quantization_bound():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    linear.weight.data[3] = 0.0  # a zero row must stay exactly zero (scale 1, not 0/0)
    x = torch.randn(2, 5, 96) * 3
    layer = X86DynamicLinear.from_float(linear)

    # the stored weight, from the formula written out: per row, scale = max |w| / 127, round to nearest
    w = linear.weight.detach()
    scale = w.abs().amax(1) / 127
    scale[3] = 1.0
    assert torch.equal(layer.weight, torch.round(w / scale[:, None]).to(torch.int8))
    assert torch.allclose(layer.weight_scale, scale) and not layer.weight_zero_point.any()

    y, ref = layer(x), F.linear(x, w, linear.bias)
    assert y.shape == ref.shape == (2, 5, 40) and y.dtype == torch.float32
    # |y - ref| ≤ Σ_k |x_k| |Δw_k| + Σ_k |w_k| |Δx_k| (+ their product): weights are off by at most half a step of their
    # row's scale; the input by at most half a step of one per-tensor uint8 scale over 7 bits (reduce_range), the
    # range stretched to include 0. The 1 % and 1e-4 slack covers float32 rounding of the sums.
    x_step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 127
    w_err = scale[:, None].expand_as(w) / 2
    bound = x.abs() @ w_err.T + (x_step / 2) * (w.abs() + w_err).sum(1)
    assert ((y - ref).abs() <= bound * 1.01 + 1e-4).all()
    assert (y - ref).abs().max() > 1e-4  # it really ran in int8
    assert torch.all(y[..., 3] == linear.bias[3])  # the zero row gives exactly its bias
    half = x.bfloat16()  # other float dtypes run in float32 and come back in their own
    assert torch.equal(layer(half), layer(half.float()).bfloat16())


def test_flop_counter_counts_the_int8_matmul():
    layer = X86DynamicLinear.from_float(nn.Linear(32, 24))
    _, flops = counted_flops(layer, torch.randn(3, 32))
    assert flops == 2 * 3 * 32 * 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_student_folder(tmp_path_factory.mktemp("int8x86"))


def test_x86_round_trip(folder, tmp_path):
    out = tmp_path / "int8"
    assert quantize_main([f"model={folder}", f"output_dir={out}", "scheme=int8_dynamic_x86"]) == 0
    info = json.loads((out / "model" / MARKER).read_text())
    fp = load_student_folder(folder)
    names = linear_names(fp, ["llm", "speech_encoder", "audio_encoder"], ["lm_head"])
    assert info["scheme"] == "int8_dynamic_x86" and info["modules"] == names

    again = load_int8_folder(out / "model")
    for name in names:
        assert isinstance(again.get_submodule(name), X86DynamicLinear), name
    assert again.llm.lm_head.weight is again.llm.model.embed_tokens.weight  # the tied head stays float and tied
    quantized = load_student_folder(folder)
    quantize_modules(quantized, names, "int8_dynamic_x86")
    batch = training_batch(again)
    for reloaded, direct in zip(outputs(again, batch), outputs(quantized, batch), strict=True):
        assert torch.equal(reloaded, direct)  # the stored tensors rebuild the same packed weights

    # Close to float32: each linear layer adds ≲ 1/254 relative weight error and, with 7-bit per-tensor activations
    # whose range an outlier sets, a few % on typical elements; a few layers in series stay within 10 % of the
    # largest logit (measured: 6 %). Any real bug (a wrong scale, a transposed weight) is off by ~100 %.
    fp_logits, x86_logits = outputs(fp, batch)[1], outputs(again, batch)[1]
    diff = (fp_logits - x86_logits).abs().max()
    assert 0 < diff <= 0.1 * fp_logits.abs().max()

    assert count_parameters(again, again.parts())["total"] == count_parameters(fp, fp.parts())["total"]
    assert weight_bytes(again, again.parts())["total"] < 0.75 * weight_bytes(fp, fp.parts())["total"]
    assert llm_shape(again.llm).linear_params == llm_shape(fp.llm).linear_params
    with safe_open(str(out / "model" / WEIGHTS), "pt") as handle:
        for name in names:  # no float copy: the layer's only [out, in] tensor is int8
            layer = again.get_submodule(name)
            assert handle.get_tensor(f"{name}.weight").dtype == torch.int8, name
            assert handle.get_tensor(f"{name}.weight_scale").shape == (layer.out_features,)
            assert {k for k in handle.keys() if k.startswith(name + ".")} <= {
                f"{name}.{s}" for s in ("weight", "weight_scale", "weight_zero_point", "bias")}
    assert not (out / "model" / "llm" / "model.safetensors").exists()


def test_x86_errors_name_the_fix(monkeypatch, capsys):
    layer = X86DynamicLinear.from_float(nn.Linear(8, 4))
    with pytest.raises(RuntimeError, match="CPU only.*int8_weight_only"):
        layer(torch.zeros(1, 8, device="meta"))
    with pytest.raises(RuntimeError, match="CPU only.*int8_weight_only"):
        nn.Sequential(layer).to("meta")  # where a GPU run would move it
    monkeypatch.setattr(int8_x86, "ENGINES", ("no-such-engine",))
    with pytest.raises(RuntimeError, match="x86 \\(FBGEMM\\) quantized engine.*int8_weight_only"):
        X86DynamicLinear(8, 4)
    with pytest.raises(SystemExit):
        quantize_main(["model=unused", "output_dir=unused", "scheme=int8_x86"])
    err = capsys.readouterr().err
    assert "scheme: must be one of" in err and "int8_dynamic_x86" in err


def test_evaluation_run_measures_the_x86_student(folder, tmp_path):
    """The quick table's path: `evaluation.run` loads the int8 folder through its usual loader and reports it."""
    assert quantize_main([f"model={folder}", f"output_dir={tmp_path / 'int8'}", "scheme=int8_dynamic_x86"]) == 0
    rng = np.random.default_rng(0)
    entries = []
    for i, (task, text) in enumerate([("asr", "the cat sat"), ("audiocaption", "a high tone")]):
        sf.write(tmp_path / f"c{i}.wav", (0.3 * rng.standard_normal(16000)).astype(np.float32), 16000)
        entries.append({"path": f"c{i}.wav", "text": text, "task": task})
    (tmp_path / "test.json").write_text(json.dumps({"annotation": entries}))
    out = tmp_path / "eval"
    evaluate_main([
        f"models=[{{name: student, loader: 'student.build:load_student_folder', path: {folder}}}, "
        f"{{name: int8, loader: 'prune.quantize:load_int8_folder', path: {tmp_path / 'int8' / 'model'}}}]",
        f"data.test=[{tmp_path / 'test.json'}]", "features.whisper_chunk_seconds=2", "efficiency.timed_runs=2",
        "efficiency.warmup_runs=1", "efficiency.decode_steps=2", "efficiency.throughput_runs=1",
        "efficiency.throughput_batch_size=2", "efficiency.max_new_tokens=3", "efficiency_clips=1",
        "generation.max_new_tokens=3", f"output_dir={out}", f"caption_cache_dir={tmp_path / 'jars'}"])
    student, int8 = load_results(out / "student" / "results.json"), load_results(out / "int8" / "results.json")
    assert int8["params"] == student["params"] and int8["weight_bytes"] < 0.75 * student["weight_bytes"]
    assert int8["tpot_ms"] > 0 and int8["asr_clips"] == 1
    # the same shapes give the same FLOPs (the encoders' counted through the int8 kernel too); int8 moves fewer bytes
    assert int8["decode_flops"] == student["decode_flops"] and int8["prefill_flops"] == student["prefill_flops"]
    assert int8["decode_bytes"] < student["decode_bytes"] and int8["prefill_bytes"] < student["prefill_bytes"]
