"""The distill recipe end to end on tiny models: cached and online teacher, across tokenizers, every term logged."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_salmonn import write_teacher_folder

from common.tracking import read_metrics
from distill.distiller import TrainingStage, anneal_scale, answer_rows, stage_setter
from distill.train import main as distill_main
from student.build import load_student_folder
from teacher.cache import main as cache_main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    write_teacher_folder(root)
    rng = np.random.default_rng(0)
    entries = []
    texts = ["the cat sat on the mat", "hello world", "the dog runs", "a high tone followed by three short beeps"]
    for i, text in enumerate(texts * 2):
        sf.write(root / f"{i}.wav", (0.3 * rng.standard_normal(8000 + 1000 * i)).astype(np.float32), 16000)
        entries.append({"path": f"{i}.wav", "text": text, "task": "asr" if i % 4 < 3 else "audiocaption"})
    (root / "train.json").write_text(json.dumps({"annotation": entries}))
    (root / "valid.json").write_text(json.dumps({"annotation": entries[:4]}))
    common = [f"data.train=[{root / 'train.json'}]", "features.whisper_chunk_seconds=2"]
    cache_main([f"teacher_folder={root / 'teacher'}", *common, "shard_size=4", "k=8", f"output_dir={root / 'cache'}"])
    return root


def recipe_args(root, out, *extra):
    return [
        f"teacher_folder={root / 'teacher'}", f"kd.cache_dir={root / 'cache'}",
        f"data.train=[{root / 'train.json'}]", f"data.valid=[{root / 'valid.json'}]",
        "features.whisper_chunk_seconds=2", "student.whisper_layers=1", "student.token_pruning.keep_ratio=0.5",
        "student.token_pruning.prune_after_layers=[0]", f"student.llm.tokenizer={root / 'student_tok'}",
        "student.llm.hidden_size=24", "student.llm.intermediate_size=48", "student.llm.num_hidden_layers=1",
        "student.llm.num_attention_heads=2", "student.llm.num_key_value_heads=1", "student.llm.head_dim=12",
        "student.llm.freeze=false", "student.tokenizer.vocab_size=150",
        "loop.max_steps=4", "loop.batch_size=4", "loop.log_every=1", "loop.eval_every=4", "loop.save_every=4",
        "optim.warmup_steps=1", "validation.max_clips_per_task=2", "validation.max_new_tokens=3",
        f"output_dir={out}", f"log_dir={out / 'runs'}", *extra,
    ]


def test_cached_cross_tokenizer_kd_with_feature_kd(setup, tmp_path):
    root = setup
    assert distill_main(recipe_args(root, tmp_path, "kd.feature_weight=1.0", "kd.uld_weight=0.1")) == 0
    records = read_metrics(tmp_path / "runs")
    steps = [r for r in records if "train/loss" in r]
    assert len(steps) == 4
    for r in steps:
        assert {"train/ce", "train/kd", "train/feature", "train/uld", "train/aligned_fraction"} <= set(r)
        assert r["train/kd"] > 0 and 0 < r["train/aligned_fraction"] <= 1
        expected = r["train/ce"] + r["train/kd"] + r["train/feature"]
        assert r["train/loss"] == pytest.approx(expected, rel=1e-4)
    tokenizer_report = next(r for r in records if "data/vocab_overlap_teacher" in r)
    assert 0 < tokenizer_report["data/vocab_overlap_student"] <= 1
    assert any("eval/wer" in r for r in records)
    student = load_student_folder(tmp_path / "model")
    assert student.speech_encoder.config.encoder_layers == 1


def test_ce_only_and_online_teacher_with_hidden_kd(setup, tmp_path):
    root = setup
    assert distill_main(recipe_args(root, tmp_path / "ce", "kd.kd_weight=0", "loop.max_steps=2")) == 0
    ce = [r for r in read_metrics(tmp_path / "ce" / "runs") if "train/loss" in r]
    assert "train/kd" not in ce[0] and ce[0]["train/loss"] == pytest.approx(ce[0]["train/ce"])
    args = recipe_args(root, tmp_path / "online", "kd.teacher=online", "kd.loss=generalized_jsd",
                       "kd.hidden_weight=0.5", "kd.feature_weight=0.5", "loop.max_steps=2")
    assert distill_main(args) == 0
    online = [r for r in read_metrics(tmp_path / "online" / "runs") if "train/loss" in r]
    assert {"train/kd", "train/hidden", "train/feature"} <= set(online[0])


def test_teacher_annealing_scales_every_kd_term_down_to_zero(setup, tmp_path):
    root = setup
    args = recipe_args(root, tmp_path, "kd.feature_weight=0.5", "kd.kd_weight=2.0", "kd.anneal=linear")
    assert distill_main(args) == 0
    steps = sorted((r for r in read_metrics(tmp_path / "runs") if "train/loss" in r), key=lambda r: r["step"])
    assert [round(r["train/kd_scale"], 4) for r in steps] == [1.0, 0.6667, 0.3333, 0.0]
    for r in steps:
        expected = r["train/ce"] + r["train/kd_scale"] * (2.0 * r["train/kd"] + 0.5 * r["train/feature"])
        assert r["train/loss"] == pytest.approx(expected, rel=1e-4)
    assert steps[-1]["train/loss"] == pytest.approx(steps[-1]["train/ce"], rel=1e-5)
    assert anneal_scale("none", 3, 4) == 1.0 and anneal_scale("linear", 0, 800) == 1.0
    assert anneal_scale("linear", 400, 801) == 0.5


def test_a_transfer_set_of_the_first_clips_reads_the_whole_splits_cache(setup, tmp_path, monkeypatch):
    from teacher.cache_store import CacheReader

    read = []
    original = CacheReader.__getitem__
    monkeypatch.setattr(CacheReader, "__getitem__", lambda self, key: read.append(key) or original(self, key))
    args = recipe_args(setup, tmp_path, "transfer_clips_per_task=1", "kd.feature_weight=1.0")
    assert distill_main(args) == 0
    # the first ASR clip is entry 0, the first captioning clip entry 3; the cache keys keep the split's numbering
    assert {key.split("|")[0] for key in read} == {"0000000", "0000003"}
    assert {key.split("|")[2] for key in read} == {str(setup / "0.wav"), str(setup / "3.wav")}
    assert len([r for r in read_metrics(tmp_path / "runs") if "train/kd" in r]) == 4


def test_a_comparison_run_to_another_output_dir_keeps_the_presets_curves(setup, tmp_path):
    """The preset names output_dir and log_dir; `output_dir=` alone on the command line (a CE-only comparison)
    logs beside its own output and leaves the first run's metrics.jsonl and event files alone."""
    preset = tmp_path / "distill.yaml"
    preset.write_text(f"job: distill.train\noutput_dir: {tmp_path / 'student'}\nlog_dir: {tmp_path / 'runs'}\n")
    args = [a for a in recipe_args(setup, tmp_path, "loop.max_steps=2")
            if not a.startswith(("output_dir=", "log_dir="))]
    assert distill_main(["--config", str(preset), *args]) == 0
    first, events = read_metrics(tmp_path / "runs"), sorted((tmp_path / "runs").glob("events.out.tfevents.*"))
    assert first and events
    assert distill_main(["--config", str(preset), *args, "kd.kd_weight=0", f"output_dir={tmp_path / 'ce'}"]) == 0
    assert read_metrics(tmp_path / "runs") == first
    assert sorted((tmp_path / "runs").glob("events.out.tfevents.*")) == events
    ce = [r for r in read_metrics(tmp_path / "ce" / "logs") if "train/loss" in r]
    assert len(ce) == 2 and "train/kd" not in ce[0]


def test_answer_rows_left_aligns_targets():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)
    labels = torch.tensor([[-100, -100, 4, 5, -100], [-100, 1, 2, 3, -100]])
    rows, mask = answer_rows(logits, labels)
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    torch.testing.assert_close(rows[0, :2], logits[0, 2:4])
    torch.testing.assert_close(rows[1], logits[1, 1:4])


def test_training_stages_switch_parts():
    model = torch.nn.Module()
    model.qformer = torch.nn.Linear(2, 2)
    model.llm = torch.nn.Linear(2, 2)
    model.projector = torch.nn.Linear(2, 2)
    setter = stage_setter(model, [TrainingStage(until_step=3, train=["qformer", "projector"]),
                                  TrainingStage(until_step=10, train=["all"])])
    setter(0)
    assert model.qformer.weight.requires_grad and not model.llm.weight.requires_grad
    setter(3)
    assert model.llm.weight.requires_grad


def test_step_bench_reports_a_ratio(setup, tmp_path):
    from distill.step_bench import main as bench_main

    config = tmp_path / "distill.yaml"
    config.write_text("job: distill.train\n")
    result = bench_main(["--config", str(config), "--steps", "2", "kd.feature_weight=1.0",
                         *recipe_args(setup, tmp_path / "bench")])
    assert result["ce"] > 0 and result["kd"] > 0 and result["ratio_kd_over_ce"] > 0


def test_kd_on_some_tasks_leaves_the_others_to_ce(setup, tmp_path, monkeypatch):
    import distill.distiller as train_module
    from distill.feature_kd import FeatureKD, HiddenStateKD

    calls, masks = [], {"feature": [], "hidden": []}
    original = train_module.cross_tokenizer_kd

    def recording(rows, teacher, alignments, *args, student_mask=None, **kwargs):
        calls.append(([len(a) for a in alignments], student_mask.any(1).tolist()))
        return original(rows, teacher, alignments, *args, student_mask=student_mask, **kwargs)

    def mask_of(kind, forward):
        return lambda self, s, t, mask=None: masks[kind].append(mask.any(1).tolist()) or forward(self, s, t, mask)

    aligned_texts = []
    original_align = train_module.align_spans
    monkeypatch.setattr(train_module, "cross_tokenizer_kd", recording)
    monkeypatch.setattr(train_module, "align_spans", lambda text, *a, **k: aligned_texts.append(text)
                        or original_align(text, *a, **k))
    monkeypatch.setattr(FeatureKD, "forward", mask_of("feature", FeatureKD.forward))
    monkeypatch.setattr(HiddenStateKD, "forward", mask_of("hidden", HiddenStateKD.forward))
    args = recipe_args(setup, tmp_path, "kd.tasks=[audiocaption]", "kd.teacher=online", "kd.feature_weight=1.0",
                       "kd.hidden_weight=1.0", "loop.max_steps=2", "loop.batch_size=8")
    assert distill_main(args) == 0
    assert aligned_texts and set(aligned_texts) == {"a high tone followed by three short beeps"}
    assert len(calls) == len(masks["feature"]) == len(masks["hidden"]) == 2
    for (lengths, has_targets), feature, hidden in zip(calls, masks["feature"], masks["hidden"], strict=True):
        captions = [n > 0 for n in lengths]  # every batch holds all 8 samples, 2 of them captions
        assert sum(captions) == 2 and has_targets == feature == hidden == captions
    records = [r for r in read_metrics(tmp_path / "runs") if "train/kd" in r]
    assert len(records) == 2 and all(r["train/kd"] > 0 and r["train/feature"] > 0 for r in records)

    with pytest.raises(SystemExit, match=r"kd.tasks names \['captions'\]"):
        distill_main(recipe_args(setup, tmp_path / "bad", "kd.tasks=[captions]"))


def test_a_frozen_students_encoders_stored_once_train_as_if_run_at_every_step(setup, tmp_path):
    """`encoder_store` with the student's Whisper and BEATs frozen: the stored outputs (fp16, like the teacher's
    store) give the step losses of running the frozen encoders, the saved student keeps the teacher's first Whisper
    layer unchanged, and a recovery run from it reuses the store. An online teacher would read the student's stored
    outputs as its own, so that is refused."""
    from teacher.checkpoint import load_model_folder

    frozen = ["student.freeze_whisper=true", "student.freeze_beats=true", "student.whisper_layer_selection=first",
              "student.whisper_pad_to_longest=false", "kd.feature_weight=1.0", "loop.max_steps=2"]
    assert distill_main(recipe_args(setup, tmp_path / "online", *frozen)) == 0
    store = tmp_path / "encoders"
    assert distill_main(recipe_args(setup, tmp_path / "stored", *frozen, f"encoder_store={store}")) == 0
    files = sorted(p.name for p in store.glob("*.safetensors"))
    assert len(files) == 1 and files[0].startswith("train-speech_encoder_out-")
    run = lambda name: [r for r in read_metrics(tmp_path / name / "runs") if "train/loss" in r]
    online, stored = run("online"), run("stored")
    assert len(online) == len(stored) == 2
    for a, b in zip(online, stored, strict=True):
        for key in ("train/ce", "train/kd", "train/feature"):
            # fp16 rounding of the stored outputs (relative 2^-11 per value) moves a loss by far less than 1e-3 of
            # itself; the feature term is ~3e-6 here (the student's Q-Former is the teacher's copy), hence abs 1e-6
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key
    loaded = load_student_folder(tmp_path / "stored" / "model")
    # saved frozen, loaded frozen (a recovery run keeps them so): BEATs too, under its token pruning
    assert not any(p.requires_grad for p in loaded.audio_encoder.parameters())
    assert not any(p.requires_grad for p in loaded.speech_encoder.parameters())
    student = loaded.speech_encoder.state_dict()
    teacher = load_model_folder(setup / "teacher").speech_encoder.state_dict()  # "first": the same key names
    assert "layers.0.fc1.weight" in student and "layers.1.fc1.weight" not in student
    for key, value in student.items():
        torch.testing.assert_close(value, teacher[key], rtol=0, atol=0, msg=key)
    args = recipe_args(setup, tmp_path / "recovered", *frozen, f"encoder_store={store}",
                       f"init_from={tmp_path / 'stored' / 'model'}")
    assert distill_main(args) == 0
    assert sorted(p.name for p in store.glob("*.safetensors")) == files  # the same encoders: the store is reused
    with pytest.raises(SystemExit, match="kd.teacher: cache"):
        distill_main(recipe_args(setup, tmp_path / "refused", *frozen, f"encoder_store={store}", "kd.teacher=online"))


def test_lora_recovery_over_the_saved_students_int8_llm(setup, tmp_path):
    """`init_from` with `student.lora.enabled` and `student.llm.int8_frozen`: the saved student's LLM stays frozen in
    int8 while LoRA adapters (and the glue) train; the folder saves the base dequantized and loads back int8 + LoRA."""
    from common.int8_frozen import is_int8, plain

    assert distill_main(recipe_args(setup, tmp_path / "student", "loop.max_steps=2")) == 0
    base = load_student_folder(tmp_path / "student" / "model")
    lora = ["student.lora.enabled=true", "student.lora.r=4", "student.lora.alpha=8", "student.lora.dropout=0.0",
            "student.llm.int8_frozen=true", f"init_from={tmp_path / 'student' / 'model'}", "loop.max_steps=3"]
    assert distill_main(recipe_args(setup, tmp_path / "lora", *lora)) == 0
    recovered = load_student_folder(tmp_path / "lora" / "model")
    llm = recovered.llm
    assert hasattr(llm, "get_base_model")
    adapters = {k: v for k, v in llm.state_dict().items() if "lora_B" in k}
    assert adapters and any(v.abs().sum() > 0 for v in adapters.values())  # B starts at zero: they trained
    q = llm.get_base_model().model.layers[0].self_attn.q_proj
    assert is_int8(q.base_layer.weight)
    before = base.llm.model.layers[0].self_attn.q_proj.weight
    after = plain(q.base_layer.weight)
    # frozen: the base moved only by its int8 rounding (half a step of a 255-level grid per row: |w|max / 254)
    bound = before.abs().amax(1, keepdim=True) / 254 * 1.01
    assert ((after - before).abs() <= bound).all()
    assert not torch.equal(recovered.projector.weight, base.projector.weight)  # the glue trains
    with pytest.raises(SystemExit, match="already has LoRA adapters"):
        distill_main(recipe_args(setup, tmp_path / "again", *lora[:-2], f"init_from={tmp_path / 'lora' / 'model'}"))
