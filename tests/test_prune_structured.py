"""Structured pruning: GQA-aware heads, MLPs, encoders; exactness against zeroed units; importance; the schedule;
save and reload in a fresh process; Gemma-2's embedding normaliser; the DepGraph hang guard."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
import yaml
from tiny_salmonn import write_official_layout
from tiny_student import build_tiny_student, training_batch, write_clips, write_student_folder
from transformers import AutoModelForCausalLM, Gemma2Config

from common.config import load_job_config
from prune.skeleton import merge_lora
from prune.structured import (
    Ratios,
    calibrate,
    check_recovery_warmup,
    describe,
    kept_channels,
    target_widths,
)
from prune.structured import main as prune_main
from prune.width import (
    DepGraphLog,
    DepGraphScopeError,
    PruningError,
    Widths,
    check_depgraph_scope,
    check_embedding_scale,
    depgraph,
    prune_to,
    time_limit,
    widths,
)
from student.build import load_student_folder, save_student_folder
from teacher.build import build_salmonn

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TARGET = Widths(llm_mlp=40, llm_heads=2, llm_kv_heads=1, whisper_mlp=40, whisper_heads=3, beats_mlp=24)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    model, cfg = build_tiny_student(root)
    return root, model, cfg


def outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(audio tokens `[batch, windows, llm_dim]`, last-position prefill logits `[batch, vocab]`)."""
    with torch.no_grad():
        audio = model.encode_audio(batch)
        return audio, model.prefill(audio, batch["prompts"])[0]


def channels(units: list[int], width: int) -> list[int]:
    return [u * width + j for u in units for j in range(width)]


def zero_removed(model, removed: dict) -> None:
    """Cut every removed unit's only path to the output (its column in the next projection) in the unpruned model."""
    llm_layers = model.llm.model.layers
    with torch.no_grad():
        for i, chans in removed["llm_mlp"].items():
            llm_layers[i].mlp.down_proj.weight[:, chans] = 0
        for i, heads in removed["llm_heads"].items():
            attn = llm_layers[i].self_attn
            attn.o_proj.weight[:, channels(heads, attn.head_dim)] = 0
        for i, chans in removed["whisper_mlp"].items():
            model.speech_encoder.layers[i].fc2.weight[:, chans] = 0
        for i, heads in removed["whisper_heads"].items():
            attn = model.speech_encoder.layers[i].self_attn
            attn.out_proj.weight[:, channels(heads, attn.head_dim)] = 0
        for i, chans in removed["beats_mlp"].items():
            model.audio_encoder.encoder.layers[i].fc2.weight[:, chans] = 0


def test_pruned_student_equals_the_original_with_removed_units_zeroed(student):
    _, original, _ = student
    model, reference = copy.deepcopy(original), copy.deepcopy(original)
    removed = prune_to(model, TARGET, "magnitude", "kv_groups", DepGraphLog())
    assert widths(model) == TARGET
    attn = model.llm.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features,
            attn.o_proj.in_features) == (16, 8, 8, 16)
    assert attn.num_key_value_groups == 2  # a KV group leaves with both query heads that read it
    for heads in removed["llm_heads"].values():
        assert heads in ([0, 1], [2, 3])
    mlp = model.llm.model.layers[1].mlp
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (40, 40, 40)
    layer = model.speech_encoder.layers[1]
    assert (layer.fc1.out_features, layer.fc2.in_features, layer.self_attn.q_proj.out_features,
            layer.self_attn.out_proj.in_features, layer.self_attn.num_heads) == (40, 40, 24, 24, 3)
    assert model.audio_encoder.encoder.layers[0].fc1.out_features == 24
    cfg = model.llm.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (40, 2, 1, 8)
    assert model.speech_encoder.config.encoder_attention_heads_kept == 3
    assert model.audio_encoder.cfg.encoder_ffn_embed_dim == 24
    zero_removed(reference, removed)
    batch = training_batch(original)
    for pruned, zeroed in zip(outputs(model, batch), outputs(reference, batch), strict=True):
        torch.testing.assert_close(pruned, zeroed, rtol=1e-5, atol=1e-5)
    unpruned = outputs(original, batch)[1]
    assert (unpruned - outputs(model, batch)[1]).abs().max() > 1e-3  # the comparison above is not vacuous


def test_query_head_mode_keeps_every_kv_head(student):
    _, original, _ = student
    model, reference = copy.deepcopy(original), copy.deepcopy(original)
    target = Widths(llm_mlp=64, llm_heads=2, llm_kv_heads=2, whisper_mlp=64, whisper_heads=4, beats_mlp=48)
    removed = prune_to(model, target, "magnitude", "query_heads", DepGraphLog())
    attn = model.llm.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups) == (16, 16, 1)
    assert (model.llm.config.num_attention_heads, model.llm.config.num_key_value_heads) == (2, 2)
    for heads in removed["llm_heads"].values():
        assert sorted(h // 2 for h in heads) == [0, 1]  # one query head leaves each KV group
    zero_removed(reference, removed)
    batch = training_batch(original)
    torch.testing.assert_close(outputs(model, batch)[1], outputs(reference, batch)[1], rtol=1e-5, atol=1e-5)


def test_magnitude_and_taylor_pick_the_units_the_formulas_pick(student):
    _, original, _ = student
    model = copy.deepcopy(original)
    mean_loss = calibrate(model, [training_batch(model)], lambda batch: model(batch).loss, torch.device("cpu"))
    assert math.isfinite(mean_loss)
    layers = model.llm.model.layers
    taylor = lambda w: (w.weight * w.weight.grad).abs()
    mlp = layers[0].mlp
    expected_mlp = (taylor(mlp.gate_proj).sum(1) + taylor(mlp.up_proj).sum(1) + taylor(mlp.down_proj).sum(0))
    attn = layers[1].self_attn
    per_kv = lambda w, dim: taylor(w).sum(1 - dim).reshape(2, -1).sum(1)  # 2 KV groups, contiguous channels
    expected_group = per_kv(attn.k_proj, 0) + per_kv(attn.v_proj, 0) + per_kv(attn.q_proj, 0) + per_kv(attn.o_proj, 1)
    magnitude_group = sum(w.weight.pow(2).sum(1 - d).reshape(2, -1).sum(1)
                          for w, d in ((attn.k_proj, 0), (attn.v_proj, 0), (attn.q_proj, 0), (attn.o_proj, 1)))
    removed = prune_to(model, TARGET, "taylor", "kv_groups", DepGraphLog())
    assert removed["llm_mlp"][0] == sorted(torch.argsort(expected_mlp)[:24].tolist())
    group = int(expected_group.argmin())
    assert removed["llm_heads"][1] == [2 * group, 2 * group + 1]
    by_magnitude = prune_to(copy.deepcopy(original), TARGET, "magnitude", "kv_groups", DepGraphLog())
    group = int(magnitude_group.argmin())
    assert by_magnitude["llm_heads"][1] == [2 * group, 2 * group + 1]


def test_random_importance_is_seeded(student):
    _, original, _ = student
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(prune_to(copy.deepcopy(original), TARGET, "random", "kv_groups", DepGraphLog()))
    assert runs[0] == runs[1] and len(runs[0]["llm_mlp"][0]) == 24


def test_schedule_widths_come_from_the_original():
    assert kept_channels(128, 0.25, 8) == 96 and kept_channels(100, 0.3, 8) == 72 and kept_channels(100, 0.3, 1) == 70
    assert kept_channels(64, 0.0, 8) == 64
    original = Widths(llm_mlp=512, llm_heads=4, llm_kv_heads=2, whisper_mlp=768, whisper_heads=4, beats_mlp=768)
    ratios = Ratios(llm_mlp=0.25, llm_heads=0.5, whisper_heads=0.5, beats_mlp=0.5)
    half, full = target_widths(original, ratios, 0.5), target_widths(original, ratios, 1.0)
    assert (half.llm_mlp, half.llm_kv_heads, half.llm_heads, half.whisper_heads, half.beats_mlp) == (448, 2, 4, 3, 576)
    assert (full.llm_mlp, full.llm_kv_heads, full.llm_heads, full.whisper_heads, full.beats_mlp) == (384, 1, 2, 2, 384)
    per_group = target_widths(original, Ratios(llm_heads=0.5, llm_head_mode="query_heads"), 1.0)
    assert (per_group.llm_kv_heads, per_group.llm_heads) == (2, 2)


def test_gemma2_normaliser_is_kept_and_checked(student):
    _, original, _ = student
    before = float(original.llm.model.embed_tokens.embed_scale)
    assert before == pytest.approx(math.sqrt(32))
    model = copy.deepcopy(original)
    prune_to(model, TARGET, "magnitude", "kv_groups", DepGraphLog())  # runs check_embedding_scale itself
    assert float(model.llm.model.embed_tokens.embed_scale) == before
    model.llm.config.hidden_size = 16  # what a reload of a hidden-size-pruned Gemma-2 would compute: √16, not √32
    with pytest.raises(PruningError, match="embedding scale"):
        check_embedding_scale(model.llm, before)


SUBPROCESS = """
import sys, torch
from transformers import AutoModelForCausalLM
from student.build import load_student_folder, save_student_folder
from teacher.build import build_salmonn
folder, inputs, out = sys.argv[1:]
torch.set_num_threads(1)  # the same reduction order as the test process
x = torch.load(inputs, weights_only=True)
model = load_student_folder(folder)
llm = AutoModelForCausalLM.from_pretrained(folder + "/llm").eval()
with torch.no_grad():
    audio = model.encode_audio(x["batch"])
    torch.save({"audio": audio, "prefill": model.prefill(audio, x["batch"]["prompts"])[0],
                "llm": llm(input_ids=x["ids"]).logits, "embeds": llm.get_input_embeddings()(x["ids"]),
                "embed_scale": float(llm.model.embed_tokens.embed_scale)}, out)
"""


def test_cli_prunes_in_steps_and_a_fresh_process_reloads_identical_outputs(tmp_path, capsys):
    folder = write_student_folder(tmp_path)
    out = tmp_path / "pruned"
    args = [f"model={folder}", f"output_dir={out}", f"log_dir={tmp_path / 'runs'}", "ratios.llm_mlp=0.375",
            "ratios.llm_heads=0.5", "ratios.whisper_mlp=0.375", "ratios.whisper_heads=0.25", "ratios.beats_mlp=0.5",
            "schedule.steps=2"]
    assert prune_main(args) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert [s["widths"]["llm_mlp"] for s in report["steps"]] == [56, 40]
    assert report["final_widths"] == dict(llm_mlp=40, llm_heads=2, llm_kv_heads=1, whisper_mlp=40, whisper_heads=3,
                                          beats_mlp=24)
    assert report["params_final"]["total"] < report["params_original"]["total"]
    assert all(".mlp" in name or not name.startswith("llm.") for s in report["steps"] for name in s["depgraph_modules"])
    llm_cfg = json.loads((out / "model" / "llm" / "config.json").read_text())
    assert (llm_cfg["intermediate_size"], llm_cfg["num_attention_heads"], llm_cfg["num_key_value_heads"],
            llm_cfg["head_dim"], llm_cfg["hidden_size"]) == (40, 2, 1, 8, 32)
    whisper_cfg = json.loads((out / "model" / "whisper" / "config.json").read_text())
    assert (whisper_cfg["encoder_ffn_dim"], whisper_cfg["encoder_attention_heads_kept"],
            whisper_cfg["encoder_attention_heads"]) == (40, 3, 4)
    assert torch.load(out / "model" / "beats.pt", weights_only=True)["cfg"]["encoder_ffn_embed_dim"] == 24
    salmonn = yaml.safe_load((out / "model" / "salmonn.yaml").read_text())
    assert (salmonn["llm"]["intermediate_size"], salmonn["whisper"]["encoder_ffn_dim"],
            salmonn["beats"]["cfg"]["encoder_ffn_embed_dim"]) == (40, 40, 24)
    assert prune_main(args) == 0 and "up to date" in capsys.readouterr().out

    model = load_student_folder(out / "model")
    batch = training_batch(model)
    ids = model.tokenizer("the cat sat on the mat", return_tensors="pt")["input_ids"]
    torch.save({"batch": {k: batch[k] for k in ("mel", "fbank", "fbank_padding_mask", "prompts")}, "ids": ids},
               tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", SUBPROCESS, str(out / "model"), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "fresh.pt")], cwd=ROOT, check=True, timeout=300, capture_output=True)
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)
    audio, prefill = outputs(model, batch)
    assert torch.equal(fresh["audio"], audio) and torch.equal(fresh["prefill"], prefill)
    with torch.no_grad():
        assert torch.equal(fresh["llm"], model.llm(input_ids=ids).logits)
        unpruned = load_student_folder(folder).llm
        assert torch.equal(fresh["embeds"], unpruned.get_input_embeddings()(ids))  # √hidden normaliser unchanged
    assert fresh["embed_scale"] == float(unpruned.model.embed_tokens.embed_scale)


def test_taylor_cli_calibrates_on_clips_from_the_distill_recipe(tmp_path):
    folder = write_student_folder(tmp_path)
    clips = write_clips(tmp_path)
    (tmp_path / "distill.yaml").write_text("job: distill.train\n")
    config = {"job": "prune.structured", "model": str(folder), "output_dir": str(tmp_path / "out"),
              "log_dir": str(tmp_path / "runs"), "importance": "taylor", "ratios": {"llm_mlp": 0.5},
              "calibration": {"clips": 4, "batch_size": 2, "loss": "ce"},
              "distill_config": str(tmp_path / "distill.yaml"),
              "distill_overrides": [f"data.train=[{clips}]", "features.whisper_chunk_seconds=2"]}
    (tmp_path / "prune.yaml").write_text(yaml.safe_dump(config))
    assert prune_main(["--config", str(tmp_path / "prune.yaml")]) == 0
    report = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert math.isfinite(report["steps"][0]["calibration_loss"]) and report["final_widths"]["llm_mlp"] == 32
    with pytest.raises(SystemExit, match="distill_config"):
        prune_main([f"model={folder}", f"output_dir={tmp_path / 'bad'}", "importance=taylor",
                    f"distill_config={tmp_path / 'missing.yaml'}"])
    with pytest.raises(SystemExit, match=r"ratios.llm_mlp must be in \[0, 1\)"):
        prune_main([f"model={folder}", f"output_dir={tmp_path / 'bad'}", "ratios.llm_mlp=1.5"])
    with pytest.raises(SystemExit, match="not a student folder"):
        prune_main([f"model={tmp_path}", f"output_dir={tmp_path / 'bad'}"])
    with pytest.raises(SystemExit, match=r"recovery_steps=5.*optim.warmup_steps is 5.*optim.warmup_steps=1"):
        prune_main([f"model={folder}", f"output_dir={tmp_path / 'bad'}", "schedule.recovery_steps=5",
                    f"distill_config={tmp_path / 'distill.yaml'}", "distill_overrides=[optim.warmup_steps=5]"])


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/*/prune*.yaml")), ids=lambda p: p.parent.name + "/" + p.name)
def test_every_presets_recovery_ends_past_its_warm_up(path):
    cfg = load_job_config(path)
    if cfg.schedule.recovery_steps > 0:
        assert load_job_config(cfg.distill_config, cfg.distill_overrides).optim.warmup_steps < \
            cfg.schedule.recovery_steps
    check_recovery_warmup(cfg)


def test_depgraph_never_sees_llm_attention(student):
    _, original, _ = student
    layer = original.llm.model.layers[0]
    with pytest.raises(DepGraphScopeError, match="#527"):
        check_depgraph_scope(layer, "gemma2")
    log = DepGraphLog()
    with pytest.raises(DepGraphScopeError):
        depgraph(original.llm, torch.zeros(1, 2, dtype=torch.long), "llm", "gemma2", log)
    assert log.modules is None  # refused before tracing
    check_depgraph_scope(layer.mlp, "gemma2")
    check_depgraph_scope(original.speech_encoder.layers[0], "whisper")  # Whisper heads do go through DepGraph
    model = copy.deepcopy(original)
    prune_to(model, TARGET, "magnitude", "kv_groups", log)
    assert log.modules == ["llm.layers.0.mlp", "llm.layers.1.mlp", "speech_encoder.layers.0", "speech_encoder.layers.1",
                           "audio_encoder.encoder.layers.0", "audio_encoder.encoder.layers.1"]


def test_time_limit_stops_a_runaway_loop():
    with pytest.raises(TimeoutError, match="toy loop"):
        with time_limit(0.2, "toy loop"):
            while True:
                pass


def test_upstream_q_proj_group_hangs_and_the_time_limit_stops_it():
    """Documents torch-pruning #527 with transformers 5: the group of a Gemma-2 q_proj never returns. If this test
    fails because the group came back, the upstream bug is fixed and LLM heads could move to DepGraph."""
    config = Gemma2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                          use_cache=False)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(config).eval()
    graph = tp.DependencyGraph().build_dependency(llm, example_inputs=torch.zeros(1, 3, dtype=torch.long),
                                                  output_transform=lambda out: out.logits.sum(), verbose=False)
    with pytest.raises(TimeoutError):
        with time_limit(3.0, "q_proj group"):
            graph.get_pruning_group(llm.model.layers[0].self_attn.q_proj, tp.prune_linear_out_channels, idxs=[0])


def test_llama_with_lora_is_merged_then_pruned_and_reloads(tmp_path):
    cfg = write_official_layout(tmp_path / "official")
    model, _ = build_salmonn(cfg)
    model.eval()
    batch = training_batch(model)
    with_adapters = outputs(model, batch)[1]
    salmonn_cfg = merge_lora(model, cfg)
    assert not salmonn_cfg.lora.enabled and type(model.llm).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(outputs(model, batch)[1], with_adapters, rtol=1e-5, atol=1e-5)
    reference = copy.deepcopy(model)
    target = Widths(llm_mlp=48, llm_heads=2, llm_kv_heads=1, whisper_mlp=64, whisper_heads=4, beats_mlp=48)
    removed = prune_to(model, target, "magnitude", "kv_groups", DepGraphLog())
    zero_removed(reference, removed)
    pruned = outputs(model, batch)[1]
    torch.testing.assert_close(pruned, outputs(reference, batch)[1], rtol=1e-5, atol=1e-5)
    save_student_folder(model.cpu(), describe(salmonn_cfg, model), tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "llm" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 8)
    assert torch.equal(outputs(load_student_folder(tmp_path / "pruned"), batch)[1], pruned)
