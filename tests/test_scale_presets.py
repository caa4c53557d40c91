"""The real-scale presets: their stages chain (each reads what the previous one writes), they hold no personal or
placeholder paths, and their teacher stage links the official layout into a teacher folder that loads."""

import os
from pathlib import Path

import pytest
import torch
from tiny_salmonn import tiny_config, write_official_layout

from common.config import load_job_config
from teacher.assemble import main as assemble_main
from teacher.cache import teacher_identity
from teacher.checkpoint import load_model_folder

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["salmonn13b-gemma2b", "salmonn7b-gemma2b"]
STAGES = ["teacher", "cache", "distill", "prune", "quantize", "evaluate", "estimate"]


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings(v)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from strings(getattr(value, name))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_stages_chain_and_match_the_plan(preset):
    folder = REPO / "configs" / preset
    cfg = {stage: load_job_config(folder / f"{stage}.yaml") for stage in STAGES}
    teacher_folder = f"{cfg['teacher'].output_dir}/model"
    assert cfg["cache"].teacher_folder == cfg["distill"].teacher_folder == teacher_folder
    assert cfg["distill"].kd.cache_dir == cfg["cache"].output_dir and cfg["distill"].kd.teacher == "cache"
    assert cfg["cache"].data.train == cfg["distill"].data.train
    out = f"outputs/{preset}"  # what distill.sh passes the prune, recover and quantize stages
    assert cfg["prune"].model == f"{cfg['distill'].output_dir}/model" == f"{out}/student/model"
    assert cfg["prune"].output_dir == f"{out}/pruned"
    assert cfg["prune"].distill_config == f"configs/{preset}/distill.yaml"
    assert cfg["quantize"].model == f"{out}/recovered/model" and cfg["quantize"].output_dir == f"{out}/int8"
    assert [(m.name, m.path) for m in cfg["evaluate"].models] == [
        ("teacher", teacher_folder), ("student", f"{out}/student/model"), ("pruned", f"{out}/pruned/model"),
        ("recovered", f"{out}/recovered/model"), ("int8", f"{out}/int8/model")]
    assert cfg["evaluate"].load == "one_at_a_time" and cfg["evaluate"].dtype == cfg["cache"].inference_dtype == "auto"
    for stage in ("cache", "distill", "evaluate"):  # the real Whisper hears its whole 30 s window at 80 mel bins
        assert (cfg[stage].features.whisper_chunk_seconds, cfg[stage].features.whisper_n_mels) == (30, 80)
    assert cfg["estimate"].teacher_config == f"configs/{preset}/teacher.yaml"
    assert cfg["estimate"].distill_config == f"configs/{preset}/distill.yaml"

    teacher, student = cfg["teacher"].model, cfg["distill"].student
    for lora in (teacher.lora, student.lora):
        assert (lora.enabled, lora.r, lora.alpha, lora.dropout, lora.target_modules) == (
            True, 8, 32, 0.1, ["q_proj", "v_proj"])
    assert student.llm.path == "checkpoints/gemma-2-2b" and student.llm.freeze
    assert 1 <= student.whisper_layers < 32 and student.token_pruning.keep_ratio < 1
    assert cfg["distill"].loop.precision == "fp16"  # a V100 has no bf16
    assert all(s.until_step <= cfg["distill"].loop.max_steps for s in cfg["distill"].stages)

    paths = [teacher.whisper.path, teacher.beats.path, teacher.llm.path, teacher.checkpoint, student.llm.path]
    assert all(p.startswith("checkpoints/") for p in paths), paths
    for stage in STAGES:
        for value in strings(cfg[stage]):
            assert not value.startswith(("/", "~")) and "/path/to" not in value and "home/" not in value, value


def test_assemble_links_the_official_layout_into_a_teacher_folder_that_loads(tmp_path, capsys):
    official = tmp_path / "official"
    write_official_layout(official)
    cfg = tiny_config(official)
    args = [f"model.whisper.path={cfg.whisper.path}", f"model.beats.path={cfg.beats.path}",
            f"model.llm.path={cfg.llm.path}", f"model.checkpoint={cfg.checkpoint}",
            "model.qformer.hidden_size=32", "model.qformer.num_attention_heads=4",
            "model.qformer.intermediate_size=64", "model.qformer.dropout=0.0", "model.lora.r=4", "model.lora.alpha=8",
            "model.lora.dropout=0.0", "model.llm.dtype=float32", f"output_dir={tmp_path / 'teacher'}"]
    assert assemble_main(args) == 0
    folder = tmp_path / "teacher" / "model"
    assert (folder / "whisper").is_dir() and not (folder / "whisper").is_symlink()
    assert all(p.is_symlink() for p in (folder / "whisper").iterdir())  # one link per file: no weight copied
    assert (folder / "salmonn.pth").resolve() == Path(cfg.checkpoint).resolve()
    model = load_model_folder(folder)
    reference = torch.load(official / "reference_state.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], msg=name)

    # The teacher cache's identity follows the linked files themselves.
    before = teacher_identity(str(folder))
    weights = official / "whisper" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert teacher_identity(str(folder)) != before
    assert assemble_main(args) == 0 and "up to date" in capsys.readouterr().out


def test_assemble_names_the_missing_checkpoint_and_the_fix(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    config = "configs/salmonn13b-gemma2b/teacher.yaml"
    assert assemble_main(["--config", config, "model.whisper.path=checkpoints/no-such-whisper",
                          f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert ("model.whisper.path: checkpoints/no-such-whisper is not a Hugging Face Whisper folder "
            "(no config.json)") in err
    assert "override model.whisper.path=" in err
