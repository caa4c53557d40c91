"""`python -m evaluation.run` end to end on tiny random models: results.json, predictions, ratios."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_salmonn import write_teacher_folder

from common.results import ANALYTIC_KEYS, METRIC_KEYS, load_results
from common.scoring import select_clips
from evaluation.efficiency import EfficiencyConfig
from evaluation.run import main as evaluate_main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_teacher_folder(root)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(3):
        sf.write(root / f"s{i}.wav", (0.3 * rng.standard_normal(16000)).astype(np.float32), 16000)
        entries.append({"path": f"s{i}.wav", "text": ["the cat sat", "hello world", "the dog runs"][i], "task": "asr"})
    for i in range(3):
        sf.write(root / f"a{i}.wav", (0.3 * rng.standard_normal(12000)).astype(np.float32), 16000)
        for caption in ("a high tone", "three short beeps"):
            entries.append({"path": f"a{i}.wav", "text": f"{caption} {i}", "task": "audiocaption"})
    (root / "test.json").write_text(json.dumps({"annotation": entries}))
    return root


def test_evaluates_two_stages_and_writes_results(setup, tmp_path):
    root = setup
    folder = root / "teacher"
    args = [
        f"models=[{{name: teacher, path: {folder}}}, {{name: copy, path: {folder}}}]",
        f"data.test=[{root / 'test.json'}]", "features.whisper_chunk_seconds=2", "efficiency.timed_runs=2",
        "efficiency.warmup_runs=1", "efficiency.decode_steps=2", "efficiency.throughput_runs=1",
        "efficiency.throughput_batch_size=2", "efficiency.max_new_tokens=3", "efficiency_clips=2",
        "generation.max_new_tokens=4", f"output_dir={tmp_path}", f"caption_cache_dir={tmp_path / 'jars'}",
    ]
    evaluate_main(args)
    results = load_results(tmp_path / "teacher" / "results.json")
    assert set(METRIC_KEYS) <= set(results)
    assert 0 <= results["wer"] and results["asr_clips"] == 3 and results["aac_clips"] == 3
    assert results["cider_d"] is not None and results["cider_d"] >= 0
    assert results["spice"] is None and results["unavailable"]["spider"] == "needs SPICE"
    assert results["params"] > 0 and results["ttft_ms"] > 0 and results["tpot_ms"] > 0
    assert all(results[key] > 0 for key in ANALYTIC_KEYS)  # analytic columns beside the measured ones
    assert "decode bytes ×" in (tmp_path / "table.md").read_text()
    assert results["settings"]["efficiency"]["protocol"] == "careful"
    lines = [json.loads(x) for x in (tmp_path / "teacher" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    aac = [x for x in lines if x["task"] == "audiocaption"]
    assert all(len(x["references"]) == 2 for x in aac)
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert comparison["ratios"]["copy"]["params"] == 1.0 and comparison["ratios"]["teacher"]["params"] == 1.0
    # Same weights, so the same predictions and scores.
    copy = load_results(tmp_path / "copy" / "results.json")
    assert copy["wer"] == results["wer"] and copy["cider_d"] == results["cider_d"]
    assert (tmp_path / "teacher" / "summary.txt").read_text().startswith("results for teacher")


def test_a_finished_evaluation_is_skipped_until_its_config_a_model_or_the_data_changes(setup, tmp_path, capsys,
                                                                                       monkeypatch):
    import shutil

    import evaluation.run as run

    root = setup
    model = shutil.copytree(root / "teacher", tmp_path / "model")
    args = [f"models=[{{name: teacher, path: {model}}}]", f"data.test=[{root / 'test.json'}]",
            "features.whisper_chunk_seconds=2", "efficiency.timed_runs=1", "efficiency.warmup_runs=1",
            "efficiency.decode_steps=1", "efficiency.throughput_runs=1", "efficiency.throughput_batch_size=1",
            "efficiency.max_new_tokens=2", "efficiency_clips=1", "generation.max_new_tokens=2",
            f"output_dir={tmp_path / 'eval'}", f"caption_cache_dir={tmp_path / 'jars'}"]
    first = evaluate_main(args)
    assert (tmp_path / "eval" / "EVALUATED").is_file()
    calls = []
    real_quality = run.quality
    monkeypatch.setattr(run, "quality", lambda *a, **k: calls.append(1) or real_quality(*a, **k))
    capsys.readouterr()
    again = evaluate_main(args)
    assert "evaluation up to date" in capsys.readouterr().out and not calls
    assert again["teacher"]["wer"] == first["teacher"]["wer"]
    evaluate_main([*args, "generation.max_new_tokens=3"])  # another config
    assert len(calls) == 1
    evaluate_main([*args, "--force"])
    assert len(calls) == 2
    evaluate_main(args)
    assert len(calls) == 2
    (root / "test.json").touch()  # regenerated data
    evaluate_main(args)
    assert len(calls) == 3
    next(p for p in model.rglob("*") if p.is_file()).touch()  # a retrained model
    evaluate_main(args)
    assert len(calls) == 4


def test_the_data_report_is_written_and_carried_into_results(setup, tmp_path):
    """on_error=skip: a duplicate, a missing clip and a silent clip are counted in data_report_test.json and in
    results.json, each named, instead of only printed."""
    root = setup
    entries = json.loads((root / "test.json").read_text())["annotation"]
    sf.write(tmp_path / "quiet.wav", np.full(8000, 1e-5, np.float32), 16000)
    extra = [dict(entries[0]), {"path": "gone.wav", "text": "x", "task": "asr"},
             {"path": str(tmp_path / "quiet.wav"), "text": "y", "task": "asr"}]
    (root / "test_bad.json").write_text(json.dumps({"annotation": entries + extra}))
    args = [f"models=[{{name: teacher, path: {root / 'teacher'}}}]", f"data.test=[{root / 'test_bad.json'}]",
            "data.on_error=skip", "features.whisper_chunk_seconds=2", "efficiency.timed_runs=1",
            "efficiency.warmup_runs=0", "efficiency.decode_steps=1", "efficiency.throughput_runs=1",
            "efficiency.throughput_batch_size=1", "efficiency.max_new_tokens=2", "efficiency_clips=1",
            "generation.max_new_tokens=2", f"output_dir={tmp_path / 'eval'}", f"caption_cache_dir={tmp_path / 'j'}"]
    evaluate_main(args)
    report = json.loads((tmp_path / "eval" / "data_report_test.json").read_text())
    data = load_results(tmp_path / "eval" / "teacher" / "results.json")["data"]
    assert data == report
    assert data["entries"] == 12 and data["kept"] == 9
    assert data["skipped"] == {"duplicate_entry": 1, "missing_audio": 1} and data["dropped"] == {"silent": 1}
    assert sorted(e["source"].rsplit("#", 1)[1] for e in data["skipped_entries"]) == ["10", "9"]
    assert data["dropped_entries"][0]["source"].endswith("test_bad.json#11")
    assert "skipped duplicate_entry=1" in (tmp_path / "eval" / "teacher" / "summary.txt").read_text()


def test_select_clips_groups_captions_and_limits():
    class Ex:
        def __init__(self, path, task, text):
            self.path, self.task, self.text = path, task, text

    class DS:
        examples = [Ex("a", "audiocaption", "x"), Ex("a", "audiocaption", "y"), Ex("b", "asr", "z"),
                    Ex("c", "audiocaption", "w"), Ex("d", "asr", "v")]

    chosen, refs = select_clips(DS(), 0)
    assert chosen == {"audiocaption": [0, 3], "asr": [2, 4]} and refs["audiocaption|a"] == ["x", "y"]
    chosen, _ = select_clips(DS(), 1)
    assert chosen == {"audiocaption": [0], "asr": [2]}


def test_hackathon_protocol_times_fixed_length_inputs(setup, tmp_path):
    from evaluation.run import JobConfig, efficiency_clips, load_test_split

    root = setup
    cfg = JobConfig(output_dir=str(tmp_path))
    cfg.data.test = [str(root / "test.json")]
    cfg.features.whisper_chunk_seconds = 2
    cfg.efficiency = EfficiencyConfig(protocol="hackathon", input_seconds=1.5)
    clips = efficiency_clips(load_test_split(cfg), cfg)
    assert len(clips) == 4 and all(int(c["mel_frames"][0]) == 150 for c in clips)
    assert cfg.efficiency.warmup_runs == 10 and cfg.efficiency.timed_runs == 100 and cfg.efficiency.statistic == "mean"
    cfg.efficiency = EfficiencyConfig(protocol="hackathon", input_seconds=10.0)
    with pytest.raises(SystemExit, match="exceeds the Whisper window"):
        efficiency_clips(load_test_split(cfg), cfg)


def test_float16_placement_halves_weight_bytes_and_models_can_load_one_at_a_time(setup, tmp_path):
    root = setup
    teacher = f"{{name: teacher, path: {root / 'teacher'}}}"
    common = [f"data.test=[{root / 'test.json'}]",
              "features.whisper_chunk_seconds=2", "efficiency.timed_runs=1", "efficiency.warmup_runs=0",
              "efficiency.decode_steps=1", "efficiency.throughput_runs=1", "efficiency.throughput_batch_size=1",
              "efficiency.max_new_tokens=2", "efficiency_clips=1", "generation.max_new_tokens=3",
              "max_clips_per_task=2", f"caption_cache_dir={tmp_path / 'jars'}", "device=cpu"]
    evaluate_main([*common, f"models=[{teacher}]", "dtype=float32", f"output_dir={tmp_path / 'fp32'}"])
    evaluate_main([*common, f"models=[{teacher}, {{name: copy, path: {root / 'teacher'}}}]", "dtype=float16",
                   "load=one_at_a_time", f"output_dir={tmp_path / 'fp16'}"])
    full = load_results(tmp_path / "fp32" / "teacher" / "results.json")
    half = load_results(tmp_path / "fp16" / "teacher" / "results.json")
    assert half["settings"]["placement"] == {"device": "cpu", "dtype": "float16", "load": "one_at_a_time"}
    comparison = json.loads((tmp_path / "fp16" / "comparison.json").read_text())
    assert comparison["reference"] == "teacher"
    assert comparison["ratios"]["teacher"]["params"] == comparison["ratios"]["copy"]["params"] == 1.0
    assert comparison["ratios"]["copy"]["tpot_ms"] > 0
    assert "| copy |" in (tmp_path / "fp16" / "table.md").read_text()
    assert half["params"] == full["params"]
    assert half["weight_bytes"] * 2 == full["weight_bytes"]
    assert half["wer"] is not None and half["cider_d"] is not None
