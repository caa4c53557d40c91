"""Gemma-2 in fp16: the probe finds overflows, the guard removes them exactly (fp32 outputs unchanged, fp16
outputs finite and close), the guarded config survives a reload, the residual clamp, and the CLI."""

import copy
import json

import pytest
import torch
from tiny_student import write_clips, write_student_folder
from transformers import AutoModelForCausalLM, Gemma2Config

from prune.fp16_check import FP16_MAX, compare, guard_gemma2, install_residual_clamp, run_twice, summary
from prune.fp16_check import main as fp16_main
from student.build import load_student_folder

torch.set_num_threads(1)
IDS = torch.tensor([[2, 17, 5, 33, 9, 41, 12, 7, 25, 3]])


def tiny_gemma2(query_pre_attn_scalar: int = 8):
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          query_pre_attn_scalar=query_pre_attn_scalar, attn_implementation="eager", use_cache=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def measure(llm) -> dict:
    fp32, fp16 = run_twice(llm, lambda probe, model: probe.attach_decoder(model), lambda model, _: model(input_ids=IDS))
    return compare(fp32, fp16)


@torch.no_grad()
def logits(llm, dtype=torch.float32, clamp=False) -> torch.Tensor:
    model = copy.deepcopy(llm).to(dtype)
    if clamp:
        install_residual_clamp(model)
    return model(input_ids=IDS).logits.float()


def test_guard_removes_an_mlp_overflow_exactly():
    llm = tiny_gemma2()
    up = llm.model.layers[0].mlp.up_proj
    with torch.no_grad():
        up.weight.mul_(3e5 / measure(llm)["layer0.mlp_intermediate"]["fp32_max_abs"])
    sites = measure(llm)
    assert sites["layer0.mlp_intermediate"]["overflow"] and sites["layer0.mlp_intermediate"]["fp32_max_abs"] > FP16_MAX
    reference = logits(llm)
    assert not torch.isfinite(logits(llm, torch.float16)).all()  # without the guard: inf → NaN after the norm
    applied = guard_gemma2(llm, sites, headroom=4.0)
    assert list(applied["mlp"]) == [0] and applied["mlp"][0] >= 32 and applied["attention"] == {}
    assert sites["layer0.mlp_up"]["fp32_max_abs"] / applied["mlp"][0] < FP16_MAX / 4  # up_proj's output itself
    torch.testing.assert_close(logits(llm), reference, rtol=1e-4, atol=1e-4)  # fp32: RMSNorm(x / s) = RMSNorm(x)
    guarded = logits(llm, torch.float16)
    assert torch.isfinite(guarded).all()
    torch.testing.assert_close(guarded, reference, rtol=0.02, atol=0.05)
    assert not any(site["overflow"] for site in measure(llm).values())


def test_soft_capping_makes_a_logit_overflow_harmless_and_the_summary_says_so():
    llm = tiny_gemma2(query_pre_attn_scalar=256)
    attn = llm.model.layers[1].self_attn
    gain = (2e5 / measure(llm)["layer1.attn_logits"]["fp32_max_abs"]) ** 0.5
    with torch.no_grad():
        attn.q_proj.weight.mul_(gain)
        attn.k_proj.weight.mul_(gain)
    sites = measure(llm)
    assert sites["layer1.attn_logits"]["fp16_nonfinite"] > 0  # q·kᵀ overflows before the 1/16 scale ...
    torch.testing.assert_close(logits(llm, torch.float16), logits(llm), rtol=0.02, atol=0.05)  # ... to no effect
    assert summary(sites, soft_capped_logits=True)["soft_capped_logit_overflows"] == ["layer1.attn_logits"]
    assert summary(sites, soft_capped_logits=True)["overflowing"] == []
    assert summary(sites)["overflowing"] == ["layer1.attn_logits"]
    for layer in llm.model.layers:  # without soft-capping (LLaMA's case) the same overflow is fatal
        layer.self_attn.attn_logit_softcapping = None
    assert not torch.isfinite(logits(llm, torch.float16)).all()


def test_guard_is_exact_after_a_reload_and_only_for_gemma2(tmp_path):
    llm = tiny_gemma2()
    with torch.no_grad():
        llm.model.layers[1].self_attn.v_proj.weight.mul_(1e6)
    sites = measure(llm)
    assert sites["layer1.attn_v"]["overflow"]
    reference = logits(llm)
    applied = guard_gemma2(llm, sites, headroom=4.0)
    assert list(applied["attention"]) == [1] and applied["mlp"] == {}
    llm.save_pretrained(tmp_path / "guarded")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "guarded").eval()
    torch.testing.assert_close(logits(again), reference, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(logits(again, torch.float16)).all()
    with pytest.raises(ValueError, match="post-norms"):
        guard_gemma2(type("L", (), {"config": type("C", (), {"model_type": "llama"})()})(), {})


def test_residual_clamp_keeps_an_overflowing_stream_finite():
    llm = tiny_gemma2()
    with torch.no_grad():
        llm.model.layers[0].post_feedforward_layernorm.weight.fill_(4e4)
    assert not torch.isfinite(logits(llm, torch.float16)).all()
    assert torch.isfinite(logits(llm, torch.float16, clamp=True)).all()
    assert torch.equal(logits(llm, clamp=True), logits(llm))  # fp32 runs are untouched


def test_cli_measures_a_student_and_a_gemma2_layer_and_writes_the_guarded_student(tmp_path):
    folder = write_student_folder(tmp_path)
    clips = write_clips(tmp_path, count=4)
    out = tmp_path / "fp16"
    report = fp16_main([f"model={folder}", f"data.test=[{clips}]", "features.whisper_chunk_seconds=2", "clips=4",
                        "batch_size=2", f"output_dir={out}", f"guarded_output={out / 'guarded'}",
                        "gemma2_layer.hidden_size=64", "gemma2_layer.intermediate_size=128",
                        "gemma2_layer.num_attention_heads=4", "gemma2_layer.num_key_value_heads=2",
                        "gemma2_layer.head_dim=16", "gemma2_layer.tokens=8"])
    saved = json.loads((out / "fp16_report.json").read_text())
    sites = saved["student"]["sites"]
    for site in ("llm.layer0.attn_logits", "llm.layer1.mlp_intermediate", "llm.layer1.output", "whisper.layer0.output",
                 "beats.layer1.output"):
        assert sites[site]["fp32_max_abs"] > 0, site
    assert saved["student"]["clips"] == 4 and saved["student"]["summary"]["overflowing"] == []
    layer = saved["gemma2_layer"]
    assert layer["config"]["intermediate_size"] == 128 and set(layer["sites"]) == {
        f"layer0.{site}" for site in ("attn_logits", "attn_v", "attn_out", "mlp_gate", "mlp_up", "mlp_intermediate",
                                      "mlp_out", "output")}
    assert report["student"]["guard"]["applied"]["mlp"] == {}  # nothing near fp16's limit: nothing changed
    assert load_student_folder(out / "guarded").llm.config.num_key_value_heads == 2
