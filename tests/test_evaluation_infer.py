"""`python -m evaluation.infer` on tiny random model folders of every kind (teacher, student, int8, export), written
and read by the stages' own save and load code: an output per clip, JSONL/JSON files, batching, clear errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_salmonn import write_teacher_folder
from tiny_student import write_student_folder

from common.dataset import DEFAULT_PROMPTS
from evaluation.infer import main as infer_main
from evaluation.models import folder_kind
from prune.export import main as export_main
from prune.quantize import main as quantize_main

torch.set_num_threads(1)

SECONDS = [1.5, 1.5, 1.5, 0.8]  # the tiny Whisper hears 2 s


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    student = write_student_folder(root)
    assert quantize_main([f"model={student}", f"output_dir={root / 'int8'}"]) == 0
    assert export_main([f"model={student}", f"output_dir={root / 'export'}"]) == 0
    rng = np.random.default_rng(0)
    for i, seconds in enumerate(SECONDS):
        sf.write(root / f"clip{i}.wav", (0.3 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
    return {"root": root, "teacher": write_teacher_folder(root), "student": student, "int8": root / "int8" / "model",
            "export": root / "export"}


def clips(models, count=None):
    return [str(models["root"] / f"clip{i}.wav") for i in range(count or len(SECONDS))]


@pytest.mark.parametrize("kind", ["teacher", "student", "int8", "export"])
def test_every_kind_of_model_folder_answers_for_every_clip(models, kind, tmp_path, capsys):
    out = tmp_path / "asr.jsonl"
    records = infer_main(["--model", str(models[kind]), "--task", "asr", *clips(models), "--output", str(out),
                          "--max-new-tokens", "4", "--device", "cpu", "--batch-size", "2"])
    assert [r["path"] for r in records] == clips(models)
    assert all(r["task"] == "asr" and r["prompt"] == DEFAULT_PROMPTS["asr"] for r in records)
    assert all(isinstance(r["output"], str) for r in records)
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"{r['path']}\t{r['output']}" for r in records]


def test_batches_give_the_outputs_of_one_clip_at_a_time(models):
    """Clips of equal length under different prompts (so rows differ and the left-padded prompts have different
    lengths): the audio path sees no padding, and the LLM's left padding is masked with positions counted from the
    mask, so a batch computes what each row computes alone; greedy decoding then picks the same tokens unless two
    logits tie within float rounding, which these seeded weights do not. (Clips of different lengths can differ:
    see `--batch-size`.)"""
    root = models["root"]
    entries = [{"path": f"clip{i}.wav", "text": "unused", "task": "audiocaption", "Q": q}
               for i, q in enumerate(["Describe the audio.", "What do you hear in this recording?", "Listen."])]
    entries.append({"path": "clip0.wav", "text": "the cat sat", "task": "asr"})
    (root / "clips.json").write_text(json.dumps({"annotation": entries}))  # audio paths relative to the JSON
    for kind in ("teacher", "student"):
        args = ["--model", str(models[kind]), str(root / "clips.json"), "--max-new-tokens", "6", "--device", "cpu"]
        alone = infer_main([*args, "--batch-size", "1"])
        together = infer_main([*args, "--batch-size", "3"])  # a full batch and a ragged last one
        assert [r["output"] for r in together] == [r["output"] for r in alone], kind
        assert len({r["output"] for r in alone}) > 1, "outputs should differ between rows, or the test shows nothing"
        assert [r["prompt"] for r in alone] == [e.get("Q") or DEFAULT_PROMPTS["asr"] for e in entries]
        assert alone[0]["path"] == str(root / "clip0.wav") and alone[3]["references"] == ["the cat sat"]


def test_annotation_json_decodes_a_captioned_clip_once_and_writes_json(models, tmp_path):
    entries = [{"path": "clip1.wav", "text": f"caption {i}", "task": "audiocaption"} for i in range(3)]
    (tmp_path / "aac.json").write_text(json.dumps({"annotation": entries}))
    shutil.copy(models["root"] / "clip1.wav", tmp_path / "clip1.wav")
    out = tmp_path / "outputs" / "aac.json"
    records = infer_main(["--model", str(models["student"]), str(tmp_path / "aac.json"), "--output", str(out),
                          "--max-new-tokens", "3", "--device", "cpu"])
    assert len(records) == 1 and records[0]["references"] == ["caption 0", "caption 1", "caption 2"]
    assert records[0]["prompt"] == DEFAULT_PROMPTS["audiocaption"]
    written = json.loads(out.read_text())
    assert written["outputs"] == records and written["loader"] == "student.build:load_student_folder"
    assert written["generation"]["max_new_tokens"] == 3


def test_task_prompts_come_from_the_training_config_beside_the_model(models, tmp_path):
    model = shutil.copytree(models["teacher"], tmp_path / "teacher" / "model")
    (tmp_path / "teacher" / "config.yaml").write_text(
        "job: teacher.train\ndata:\n  prompts:\n    asr: Transcribe this.\n")
    [record] = infer_main(["--model", str(model), "--task", "asr", clips(models, 1)[0], "--max-new-tokens", "2"])
    assert record["prompt"] == "Transcribe this."


def test_a_folder_that_is_no_model_names_the_kinds_and_the_model_folder_inside(models):
    with pytest.raises(SystemExit) as err:
        infer_main(["--model", str(models["root"] / "int8"), "--task", "asr", clips(models, 1)[0]])
    message = str(err.value)
    assert "is not a model folder" in message and "quantization.json" in message and "salmonn.pth" in message
    assert f"use {models['int8']}" in message


def test_bad_input_exits_with_the_file_named_and_no_traceback(models, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    missing = tmp_path / "missing.wav"
    run = subprocess.run([sys.executable, "-m", "evaluation.infer", "--model", str(models["teacher"]), "--task", "asr",
                          clips(models, 1)[0], str(missing)], capture_output=True, text=True, env=env)
    assert run.returncode != 0 and run.stdout == ""
    assert f"error: {missing}: audio file not found" in run.stderr and "Traceback" not in run.stderr
    (tmp_path / "noise.wav").write_text("not audio")
    with pytest.raises(SystemExit, match=f"{tmp_path / 'noise.wav'}: cannot decode audio"):
        infer_main(["--model", str(models["teacher"]), "--task", "asr", str(tmp_path / "noise.wav")])
    with pytest.raises(SystemExit, match="needs --task"):
        infer_main(["--model", str(models["teacher"]), clips(models, 1)[0]])


def test_cli_writes_jsonl_for_clips_longer_than_the_model_hears(models, tmp_path):
    """The subprocess path end to end; a 3 s clip is cut to the tiny Whisper's 2 s window, with a warning."""
    sf.write(tmp_path / "long.wav", (0.3 * np.random.default_rng(1).standard_normal(48000)).astype(np.float32), 16000)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "evaluation.infer", "--model", str(models["int8"]), "--prompt",
                          "Describe the audio.", str(tmp_path / "long.wav"), *clips(models, 2), "--output", str(out),
                          "--max-new-tokens", "3", "--batch-size", "4"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "long.wav is 3.0 s; the model hears its first 2 s" in run.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["path"] for x in lines] == [str(tmp_path / "long.wav"), *clips(models, 2)]
    assert all(x["task"] is None and x["prompt"] == "Describe the audio." for x in lines)
    assert run.stdout.splitlines() == [f"{x['path']}\t{x['output']}" for x in lines]


def test_folder_kind_recognises_each_stage(models):
    assert folder_kind(models["teacher"]).loader == "student.build:load_student_folder"
    assert folder_kind(models["int8"]).loader == "prune.quantize:load_int8_folder"
    assert folder_kind(models["export"]).loader == "prune.export:load_export"
