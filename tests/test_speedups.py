"""`evaluation.speedups` and `evaluation.inference_options` on tiny teacher (LLaMA + LoRA), student (Gemma-2) and int8
folders: every option generates the baseline's greedy tokens, and the JSON and the table have every option of every
model. No time is asserted on (the CPU is shared); only that each timed option has positive medians and ratios."""

import dataclasses
import json

import pytest
import torch
from tiny_salmonn import tiny_batch, write_teacher_folder
from tiny_student import write_clips, write_student_folder

from common.config import ConfigError, from_dict
from evaluation.efficiency import EfficiencyConfig, compare
from evaluation.inference_options import (
    OPTIONS,
    InferenceOption,
    OptionModel,
    attention_applied,
    greedy_tokens,
    prefill_length,
    static_cache,
)
from evaluation.speedups import bench_model, markdown
from evaluation.speedups import main as speedups_main
from prune.quantize import main as quantize_main
from student.build import load_student_folder

torch.set_num_threads(1)
LOADERS = {"teacher": "teacher.checkpoint:load_model_folder", "student": "student.build:load_student_folder",
           "int8": "prune.quantize:load_int8_folder"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("speedups")
    student = write_student_folder(root)
    assert quantize_main([f"model={student}", f"output_dir={root / 'int8'}"]) == 0
    return {"teacher": write_teacher_folder(root), "student": student, "int8": root / "int8" / "model",
            "clips": write_clips(root)}


def run_bench(folders, out, names, options=tuple(OPTIONS)):
    models = ", ".join(f"{{name: {name}, loader: {LOADERS[name]}, path: {folders[name]}}}" for name in names)
    return speedups_main(["--config", "configs/smoke/evaluate.yaml", "--out", str(out), "--options", ",".join(options),
                          f"models=[{models}]",
                          f"data.test=[{folders['clips']}]", "features.whisper_chunk_seconds=2", "feature_store=",
                          "efficiency_clips=2", "threads=1", "efficiency.warmup_runs=1", "efficiency.timed_runs=2",
                          "efficiency.decode_steps=3"])


def check_bench(result, out, names, options=tuple(OPTIONS)):
    """Every option of every model timed, with the baseline's greedy tokens and (nearly) its logits; JSON = result."""
    written = json.loads((out / "speedups.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert list(written["models"]) == list(names)
    table = (out / "speedups.md").read_text()
    for model, block in written["models"].items():
        assert list(block["options"]) == list(options)
        for name, row in block["options"].items():
            assert f"| {model} | {name} |" in table
            assert "skipped" not in row, (model, name, row.get("skipped"))
            assert row["same_tokens"], (model, name)
            # float32: SDPA against eager, compiled against eager kernels only reorder sums (≤ 2e-7 measured here);
            # decode positions off by one (a broken static path) moved these tiny models' logits by ≥ 1e-3
            assert row["max_logit_diff"] < 1e-5, (model, name)
            assert row["ttft_ms"] > 0 and row["tpot_ms"] > 0 and row["tpot"]["n"] == 2 * 3
            assert all(value > 0 for value in row["ratio"].values())
        assert block["options"]["baseline"]["ratio"]["tpot_ms"] == 1.0
        assert block["options"]["baseline"]["max_logit_diff"] == 0.0
    return written


def test_bench_keeps_the_tokens_of_an_int8_gemma2(folders, tmp_path):
    """The int8 student alone (Gemma-2 with sliding layers, torchao weights in a compiled decode step), the encoders
    left uncompiled (half a minute of compiling: the slow test below covers them)."""
    options = ("baseline", "eager_attention", "sdpa_attention", "static_cache", "compile_decode")
    check_bench(run_bench(folders, tmp_path, ["int8"], options), tmp_path, ["int8"], options)


@pytest.mark.slow
def test_bench_runs_every_option_of_every_stage(folders, tmp_path):
    """Teacher (LLaMA + LoRA, SDPA as loaded), student and int8: ~2.5 min cold (compiling), ~35 s warm."""
    written = check_bench(run_bench(folders, tmp_path, list(LOADERS)), tmp_path, list(LOADERS))
    # eager attention really switched the LLaMA teacher (SDPA as loaded) and was restored after
    assert written["models"]["teacher"]["options"]["eager_attention"]["attention"]["LlamaForCausalLM"] == "eager"
    assert written["models"]["teacher"]["options"]["baseline"]["attention"]["LlamaForCausalLM"] == "sdpa"


def test_static_cache_decodes_like_the_dynamic_one_over_many_steps(folders):
    """The static path (full-length mask, in-place cache, sliding layers replaced) gives the dynamic path's logits at
    every step, on a Gemma-2 student whose sliding window is shorter than the cache (so its sliding layers stay)."""
    model = load_student_folder(folders["student"]).eval()
    clip = {key: value[:1] for key, value in tiny_batch(1).items()}
    steps = 12
    length = prefill_length(model, clip, "Describe the audio.")
    for window in (4096, length + 5):  # covers the cache; ends inside the decoded steps
        model.llm.config.sliding_window = window
        static = OptionModel(model, InferenceOption(static_cache=True), max_cache_len=length + steps + 1)
        tokens, logits = greedy_tokens(static, clip, "Describe the audio.", steps)
        base_tokens, base_logits = greedy_tokens(model, clip, "Describe the audio.", steps)
        assert tokens == base_tokens
        torch.testing.assert_close(logits, base_logits, rtol=0, atol=1e-5)  # float32, same kernels: rounding only


def test_static_cache_keeps_sliding_layers_whose_window_is_shorter():
    from transformers import Gemma2Config

    config = Gemma2Config(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=4, sliding_window=10)
    assert [layer.is_sliding for layer in static_cache(config, 10).layers] == [False, False]
    assert [layer.is_sliding for layer in static_cache(config, 11).layers] == [True, False]


def test_attention_applied_restores_each_part(folders):
    from teacher.checkpoint import load_model_folder

    model = load_model_folder(folders["teacher"])
    before = {type(m).__name__: m.config._attn_implementation for m in model.modules() if hasattr(m, "config")
              and hasattr(m.config, "_attn_implementation")}
    with attention_applied(model, "eager") as running:
        assert set(running.values()) == {"eager"}
    after = {type(m).__name__: m.config._attn_implementation for m in model.modules() if hasattr(m, "config")
             and hasattr(m.config, "_attn_implementation")}
    assert after == before


def test_compile_decode_needs_a_static_cache():
    with pytest.raises(ValueError, match="static_cache"):
        InferenceOption(compile_decode=True)
    with pytest.raises(ValueError, match="attention"):
        InferenceOption(attention="flash")


def test_unknown_option_and_model_are_named(folders, capsys):
    with pytest.raises(SystemExit):
        speedups_main(["--config", "configs/smoke/evaluate.yaml", "--options", "static,compile_decode"])
    assert "unknown ['static']" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not in configs/smoke/evaluate.yaml"):
        speedups_main(["--config", "configs/smoke/evaluate.yaml", "--models", "teachr"])


def test_harness_option_is_timed_and_the_model_restored(folders, monkeypatch):
    """`efficiency.speedups` in `compare` (what evaluation.run reads): the timed decode steps go through the static
    path with eager attention, the settings say so, and afterwards the model runs its own attention again."""
    from teacher.checkpoint import load_model_folder

    model = load_model_folder(folders["teacher"])
    steps = []
    original = OptionModel.decode_step
    monkeypatch.setattr(OptionModel, "decode_step", lambda self, *a: steps.append(1) or original(self, *a))
    clip = {key: value[:1] for key, value in tiny_batch(1).items()}
    option = InferenceOption(attention="eager", static_cache=True, compile_decode=True)
    cfg = EfficiencyConfig(warmup_runs=1, timed_runs=2, decode_steps=3, throughput_runs=0, bandwidth_seconds=0,
                           speedups=option)
    result = compare({"teacher": model}, [clip], cfg)
    assert len(steps) == (1 + 1 + 2 + 1) * 3  # compile pass, warm-up, timed runs, memory run: 3 steps each
    assert result["settings"]["speedups"] == dataclasses.asdict(option)
    assert result["settings"]["attention"]["teacher"]["LlamaForCausalLM"] == "eager"
    assert model.llm.base_model.model.config._attn_implementation == "sdpa"
    assert result["models"]["teacher"]["tpot_ms"] > 0


def test_harness_option_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="speedups.attention"):
        from_dict(EfficiencyConfig, {"speedups": {"attention": "flash"}})
    with pytest.raises(ValueError, match="compile_decode needs static_cache"):
        from_dict(EfficiencyConfig, {"speedups": {"compile_decode": True}})
    assert from_dict(EfficiencyConfig, {}).speedups == InferenceOption()  # the default changes nothing


def test_a_failing_option_is_skipped_with_its_reason_and_the_others_run(folders, monkeypatch):
    import evaluation.inference_options as inference_options

    def unavailable(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no compiler backend on this machine\nmore lines of a long message")
        return run

    monkeypatch.setattr(inference_options.torch, "compile", unavailable)
    model = load_student_folder(folders["student"]).eval()
    clip = {key: value[:1] for key, value in tiny_batch(1).items()}
    cfg = EfficiencyConfig(warmup_runs=1, timed_runs=2, decode_steps=2, throughput_runs=0)
    with torch.inference_mode():
        rows = bench_model(model, [clip], cfg, list(OPTIONS))["options"]
    compiled = {"compile_decode", "compile_encoders", "all_compiled"}
    assert {name for name, row in rows.items() if "skipped" in row} == compiled
    for name in compiled:
        assert rows[name]["skipped"].startswith("RuntimeError: no compiler backend on this machine (")
    assert all(rows[name]["tpot"]["n"] == 2 * 2 for name in set(OPTIONS) - compiled)
    assert "| compile_decode | – |" in markdown({"settings": {"timed_runs": 2, "decode_steps": 2, "threads": 1,
                                                             "torch": "", "transformers": "", "command": ""},
                                               "models": {"student": {"options": rows}}})
