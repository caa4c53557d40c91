"""`evaluation.gpu_check --dry`: the GPU check's code path on the CPU with tiny teacher, student and int8 folders; the
JSON has every model under both protocols with positive numbers and the analytic columns."""

import json

import pytest
import torch
from tiny_salmonn import write_teacher_folder
from tiny_student import write_clips, write_student_folder

from evaluation.gpu_check import PER_MODEL_KEYS
from evaluation.gpu_check import main as gpu_check_main
from prune.quantize import main as quantize_main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    teacher = write_teacher_folder(root)
    student = write_student_folder(root)
    assert quantize_main([f"model={student}", f"output_dir={root / 'int8'}"]) == 0
    return {"teacher": teacher, "student": student, "int8": root / "int8" / "model", "clips": write_clips(root)}


def test_dry_run_writes_every_model_and_field(folders, tmp_path):
    models = ", ".join(f"{{name: {name}, loader: {loader}, path: {folders[name]}}}" for name, loader in [
        ("teacher", "teacher.checkpoint:load_model_folder"), ("student", "student.build:load_student_folder"),
        ("int8", "prune.quantize:load_int8_folder")])
    out = tmp_path / "check.json"
    gpu_check_main(["--dry", "--out", str(out), f"models=[{models}]", f"data.test=[{folders['clips']}]",
                    "features.whisper_chunk_seconds=2", "efficiency_clips=2", "threads=1"])
    result = json.loads(out.read_text())
    assert result["settings"]["dry"] and result["settings"]["device"] == "cpu"
    assert result["settings"]["attention"] == "sdpa_math"
    assert set(result["protocols"]) == {"careful", "hackathon"}
    hackathon = result["protocols"]["hackathon"]["settings"]
    assert hackathon["statistic"] == "mean" and hackathon["input_seconds"] == 2  # cut to the Whisper window
    for protocol in result["protocols"].values():
        assert list(protocol["models"]) == ["teacher", "student", "int8"]
        for name, report in protocol["models"].items():
            for key in (*PER_MODEL_KEYS, "tpot_floor_ms"):
                assert report[key] > 0, (name, key)
            for key in ("decode_flops", "decode_bytes", "prefill_flops", "prefill_bytes"):
                assert report["analytic"] and report[key] > 0, (name, key)
        ratios = protocol["ratios"]
        assert ratios["teacher"]["tpot_ms"] == 1.0
        # int8 weights: fewer bytes per decoded token than the float student it came from
        assert protocol["models"]["int8"]["decode_bytes"] < protocol["models"]["student"]["decode_bytes"]
