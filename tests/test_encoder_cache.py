"""Cached outputs of frozen encoders (the mini preset's teacher recipe), on tiny random models and real audio files.

- `trim_to_audio` makes a clip's encoder outputs independent of its batch, so cached outputs give exactly the loss
  and Q-Former outputs of running the frozen encoders;
- the LM head over the target window only gives the same loss;
- `whisper.per_clip` runs Whisper on each clip alone, so its outputs can be cached;
- `teacher.train` with BEATs tagging and LLM pretraining and an encoder store: BEATs and the LLM's base change, the
  frozen Whisper does not, and `teacher.cache` reuses the store the training wrote;
- `data.max_clips_per_task` keeps the first clips of each task with all their captions.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from tiny_salmonn import write_official_layout

from common.dataset import ENCODER_OUTPUTS, AudioTextCollator, AudioTextDataset, DataConfig
from common.feature_store import with_encoder_outputs
from common.features import FeatureConfig
from teacher.build import build_salmonn, read_hf_weights
from teacher.checkpoint import load_model_folder
from teacher.salmonn import AUDIO_OUT, SPEECH_OUT, shift_for_next_token
from teacher.train_aids import average_precision, caption_tags

torch.set_num_threads(1)
FEATURES = FeatureConfig(whisper_chunk_seconds=2)  # the tiny Whisper reads 2 s (max_source_positions 100)
SECONDS = [0.73, 1.31, 1.9, 0.55, 1.12]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder_cache")
    cfg = write_official_layout(root / "official")
    rng = np.random.default_rng(0)
    entries = []
    texts = ["the cat sat", "hello world", "the dog runs on the mat"]
    for i, seconds in enumerate(SECONDS):
        sf.write(root / f"{i}.wav", (0.3 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
        if i < 3:
            entries.append({"path": f"{i}.wav", "text": texts[i], "task": "asr"})
        else:
            for caption in (f"a high tone then {i} beeps", f"{i} short beeps after a high tone"):
                entries.append({"path": f"{i}.wav", "text": caption, "task": "audiocaption"})
    (root / "train.json").write_text(json.dumps({"annotation": entries}))
    return root, cfg


def trimmed(cfg):
    """The tiny SALMONN reading only the frames that hold audio, both encoders frozen, in eval mode."""
    cfg = dataclasses.replace(cfg, checkpoint="", qformer=dataclasses.replace(cfg.qformer, trim_to_audio=True),
                              beats=dataclasses.replace(cfg.beats, padding_features="zero"))
    torch.manual_seed(0)
    model, _ = build_salmonn(cfg)
    return model.eval()


def dataset(root, **data):
    return AudioTextDataset.scan([str(root / "train.json")], DataConfig(**data), FEATURES)


def cached_dataset(model, ds, store, dtype=torch.float32):
    keys = model.cacheable_encoders()
    encode = lambda batch: model.encoder_outputs(batch, keys)
    return with_encoder_outputs(ds, encode, model.encoder_fingerprint(keys), FEATURES, store, "train", batch_size=2,
                                dtype=dtype)


def test_a_clips_encoder_outputs_do_not_depend_on_its_batch(setup):
    root, cfg = setup
    model = trimmed(cfg)
    ds = dataset(root)
    collate = AudioTextCollator()
    with torch.no_grad():
        alone = model.encoder_outputs(collate([ds[0]]), [SPEECH_OUT, AUDIO_OUT])
        batched = model.encoder_outputs(collate([ds[0], ds[2]]), [SPEECH_OUT, AUDIO_OUT])
        joined_alone = model.join_encoders(collate([ds[0]]))
        joined = model.join_encoders(collate([ds[0], ds[2]]))
    # 0.73 s: 73 mel frames -> 37 Whisper frames; 71 fbank frames -> 4 whole 160 ms patches x 8 = 32 BEATs tokens
    assert alone[SPEECH_OUT][0].shape == (37, 32) and alone[AUDIO_OUT][0].shape == (32, 24)
    for key in (SPEECH_OUT, AUDIO_OUT):
        torch.testing.assert_close(batched[key][0], alone[key][0], atol=1e-5, rtol=1e-5)
    # The batch is cut to its longest clip (1.9 s -> 95 frames), not Whisper's whole 2 s chunk (100 frames).
    assert joined_alone.shape[1] == 37 and joined.shape[1] == 95
    torch.testing.assert_close(joined[0, :37], joined_alone[0], atol=1e-5, rtol=1e-5)
    # Past the clip's audio the joined frames are the layer norms' biases (of zeros), in any batch.
    expected = torch.cat([model.ln_speech.bias, model.ln_audio.bias])
    torch.testing.assert_close(joined[0, 40:], expected.expand(55, -1))


def test_whisper_per_clip_runs_each_clip_alone_and_can_be_cached(setup):
    """`whisper.per_clip`: each clip's Whisper outputs are the encoder over its own mel frames only (no padding), the
    same in any batch, zero-padded to the batch's longest clip; so a frozen one is cached even with pad_to_longest."""
    from teacher.salmonn import whisper_any_length

    root, cfg = setup
    model = trimmed(dataclasses.replace(cfg, whisper=dataclasses.replace(cfg.whisper, per_clip=True,
                                                                         pad_to_longest=True)))
    assert model.whisper_per_clip and model.cacheable_encoders() == [SPEECH_OUT, AUDIO_OUT]
    ds = dataset(root)
    collate = AudioTextCollator()
    with torch.no_grad():
        batch = collate([ds[0], ds[2], ds[1]])
        speech = model.encode_speech(batch)
        # Written out: the encoder over the clip's own 73 / 190 / 131 mel frames (rounded up to even), alone.
        own = [whisper_any_length(model.speech_encoder, ds[i]["mel"][None, :, : n + n % 2])[0]
               for i, n in ((0, 73), (2, 190), (1, 131))]
    assert speech.shape == (3, 95, 32)
    for row, expected in enumerate(own):
        torch.testing.assert_close(speech[row, : len(expected)], expected, atol=1e-5, rtol=1e-5)
        assert not speech[row, len(expected):].any()
    # Not what the whole-chunk encoder gives: per_clip changes the features (so it is saved with the model).
    with torch.no_grad():
        chunk = trimmed(cfg).encode_speech(batch)
    assert not torch.allclose(chunk[0, :37], speech[0, :37], atol=1e-3)


def test_a_teachers_whisper_pass_stores_what_its_first_layer_cut_computes(setup, tmp_path, monkeypatch):
    """`speech_cuts`: the pass that stores the teacher's Whisper outputs also stores those of its first k layers
    under its final norm, in the file a student cut from it ("first" selection, k layers) looks for, so that
    student reads them without running its encoder; they are what the student computes itself. A student whose
    layer is another (the "spaced" choice of 1 layer: the last) has another fingerprint and computes its own."""
    import copy

    from student.build import distill_whisper_encoder, select_layers
    from teacher.encoder_store import with_cached_encoders

    root, cfg = setup
    teacher = trimmed(dataclasses.replace(cfg, whisper=dataclasses.replace(cfg.whisper, per_clip=True)))
    ds = dataset(root)
    with_cached_encoders(teacher, ds, FEATURES, str(tmp_path), "train", speech_cuts=[1])
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) == 3  # Whisper, its 1-layer cut, BEATs

    def student(selection):
        model = copy.deepcopy(teacher)
        model.speech_encoder = distill_whisper_encoder(teacher.speech_encoder, select_layers(2, 1, selection))
        return model.requires_grad_(False).eval()

    first, spaced = student("first"), student("spaced")
    assert first.encoder_fingerprint([SPEECH_OUT]) == teacher.encoder_fingerprint([SPEECH_OUT], speech_layers=1)
    assert spaced.encoder_fingerprint([SPEECH_OUT]) != first.encoder_fingerprint([SPEECH_OUT])

    def refuse(*args, **kwargs):
        raise AssertionError("the student's outputs were computed, not read from the teacher's pass")

    with monkeypatch.context() as patch:
        patch.setattr("teacher.encoder_store.build_encoder_store", refuse)
        stored = with_cached_encoders(first, ds, FEATURES, str(tmp_path), "train")
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == files
    collate = AudioTextCollator()
    for i in range(len(ds)):
        own = first.encoder_outputs(collate([ds[i]]), [SPEECH_OUT])[SPEECH_OUT][0]
        # stored in fp16 (relative rounding 2^-11) of values within a few units after the norm
        torch.testing.assert_close(stored[i][SPEECH_OUT], own, rtol=2e-3, atol=2e-3)
    with_cached_encoders(spaced, ds, FEATURES, str(tmp_path), "train")
    assert len(list(tmp_path.glob("*.safetensors"))) == 4  # its own Whisper file; BEATs' is the teacher's


def test_stored_augmented_copies_are_the_encoders_over_each_epochs_draw(setup, tmp_path):
    """`data.augment.stored_copies`: the frozen encoders' outputs of K augmented copies, copy c drawn as epoch c
    draws it, and epoch e reads copy e mod K; an encoder store with augmentation and no copies is refused."""
    from common.augment import AugmentConfig, with_augmentation
    from teacher.encoder_store import refuse_augmented, with_stored_augmented_copies

    root, cfg = setup
    model = trimmed(dataclasses.replace(cfg, whisper=dataclasses.replace(cfg.whisper, per_clip=True)))
    ds = dataset(root)
    augment = AugmentConfig(speed_perturb=0.2, time_masks=1, time_mask_frames=10, stored_copies=2)
    augmented = with_augmentation(ds, augment, seed=3)
    train = with_stored_augmented_copies(model, augmented, FEATURES, str(tmp_path), "train")
    assert len(list(tmp_path.glob("*.safetensors"))) == 4  # 2 copies x (Whisper, BEATs)
    collate = AudioTextCollator()
    speech = {}
    for epoch in (0, 1, 2):
        train.set_epoch(epoch)
        augmented.set_epoch(epoch % 2)
        for i in range(3):  # the ASR clips: one item each, so the store drew each at its own index
            own = model.encoder_outputs(collate([augmented[i]]), [SPEECH_OUT, AUDIO_OUT])
            item = train[i]
            assert item["text"] == ds[i]["text"]
            for key in (SPEECH_OUT, AUDIO_OUT):
                # stored in fp16 (relative rounding 2^-11) of values within a few units
                torch.testing.assert_close(item[key], own[key][0], rtol=2e-3, atol=2e-3)
            speech[epoch, i] = item[SPEECH_OUT]
    for i in range(3):
        assert torch.equal(speech[0, i], speech[2, i])  # epoch 2 reads copy 0 again
    assert any(speech[0, i].shape != speech[1, i].shape or not torch.equal(speech[0, i], speech[1, i])
               for i in range(3))  # the copies are different draws
    plain = [(math.ceil(ds[i]["duration"] * 100) + 1) // 2 for i in range(3)]  # Whisper frames, unaugmented
    assert any(speech[e, i].shape[0] != plain[i] for e in (0, 1) for i in range(3))  # speed perturbation stored
    with pytest.raises(SystemExit, match="stored_copies"):
        refuse_augmented(AugmentConfig(time_masks=1), copies_supported=True)
    refuse_augmented(augment, copies_supported=True)
    with pytest.raises(SystemExit, match="encoder_store reads cached"):
        refuse_augmented(augment)  # distill.train: no stored copies there


def test_cached_outputs_give_the_loss_of_the_frozen_encoders(setup, tmp_path):
    root, cfg = setup
    model = trimmed(cfg)
    assert model.cacheable_encoders() == [SPEECH_OUT, AUDIO_OUT]
    ds = dataset(root)
    cached = cached_dataset(model, ds, tmp_path)
    assert cached.keys == sorted(ENCODER_OUTPUTS) and len(cached) == len(ds) == 7
    collate = AudioTextCollator(model.tokenizer)
    rows = [1, 3, 4, 6]  # different lengths, a captioning clip twice; the store ran other batches
    with torch.no_grad():
        live = model(collate([ds[i] for i in rows]))
        batch = collate([cached[i] for i in rows])
        assert batch[SPEECH_OUT].shape[0] == 4 and batch[AUDIO_OUT].shape[2] == 24
        # The cached batch never runs an encoder: break them to prove it.
        model.speech_encoder.forward = model.audio_encoder.forward_fbank = None
        from_cache = model(batch)
    torch.testing.assert_close(from_cache.qformer_out, live.qformer_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_cache.loss, live.loss, atol=1e-5, rtol=1e-5)
    # float16 storage (the default) moves the loss by a rounding error only.
    model = trimmed(cfg)
    half = cached_dataset(model, ds, tmp_path / "half", dtype=torch.float16)
    with torch.no_grad():
        loss16 = model(collate([half[i] for i in rows])).loss
    torch.testing.assert_close(loss16, live.loss, atol=2e-3, rtol=1e-3)


def test_store_is_rebuilt_when_an_encoder_changes(setup, tmp_path):
    root, cfg = setup
    model = trimmed(cfg)
    ds = dataset(root)
    first = cached_dataset(model, ds, tmp_path).path
    assert cached_dataset(model, ds, tmp_path).path == first  # reused
    with torch.no_grad():
        model.audio_encoder.encoder.layers[0].fc1.weight.add_(0.01)
    second = cached_dataset(model, ds, tmp_path).path
    assert second != first and len(list(tmp_path.glob("train-*.safetensors"))) == 2


def test_which_encoders_can_be_cached(setup):
    _, cfg = setup
    model = trimmed(cfg)
    model.audio_encoder.requires_grad_(True)
    assert model.cacheable_encoders() == [SPEECH_OUT]  # a BEATs that trains runs at every step
    model.pad_to_longest = True
    assert model.cacheable_encoders() == []  # Whisper over the batch's longest clip: depends on the batch
    untrimmed, _ = build_salmonn(dataclasses.replace(cfg, checkpoint=""))
    assert untrimmed.cacheable_encoders() == [SPEECH_OUT]  # BEATs keeps a clip's partly padded last patch


def test_lm_head_over_the_target_window_gives_the_same_loss(setup):
    root, cfg = setup
    model = trimmed(cfg)
    ds = dataset(root)
    batch = AudioTextCollator(model.tokenizer)([ds[i] for i in (0, 2, 5)])
    with torch.no_grad():
        full = model(batch)
        window = model(batch, target_logits_only=True)
    assert window.logits.shape[1] < full.logits.shape[1]
    torch.testing.assert_close(window.loss, full.loss, atol=1e-6, rtol=1e-6)
    full_logits, full_labels = shift_for_next_token(full.logits, full.labels)
    logits, labels = shift_for_next_token(window.logits, window.labels)
    for row in range(3):
        torch.testing.assert_close(logits[row][labels[row] != -100], full_logits[row][full_labels[row] != -100],
                                   atol=1e-5, rtol=1e-5)


def test_max_clips_per_task_keeps_the_first_clips_with_all_captions(setup):
    root, _ = setup
    ds = dataset(root, max_clips_per_task=1)
    assert [(ex.task, ex.path.rsplit("/", 1)[-1]) for ex in ds.examples] == [
        ("asr", "0.wav"), ("audiocaption", "3.wav"), ("audiocaption", "3.wav")]
    assert ds.report.dropped["beyond_max_clips_per_task"] == 4  # entries: 2 ASR clips, 1 clip with 2 captions


def test_caption_tags_are_shares_of_the_clips_captions(setup):
    root, _ = setup
    tags, targets = caption_tags(dataset(root), min_clips=2)
    assert tags == ["a", "after", "beeps", "high", "short", "then", "tone"]  # "3" and "4" name one clip each
    clip = targets[str(root / "3.wav")]
    assert dict(zip(tags, clip.tolist(), strict=True)) == {"a": 1.0, "after": 0.5, "beeps": 1.0, "high": 1.0,
                                                           "short": 0.5, "then": 0.5, "tone": 1.0}


def test_average_precision_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    positive = torch.tensor([True, False, True, False])
    assert average_precision(scores, positive) == pytest.approx((1 / 1 + 2 / 3) / 2)  # hits at ranks 1 and 3
    assert average_precision(-scores, positive) == pytest.approx((1 / 2 + 2 / 4) / 2)


@pytest.mark.slow
def test_teacher_recipe_pretrains_beats_caches_encoders_and_the_cache_job_reuses_them(setup, tmp_path):
    from teacher.cache import main as cache_main
    from teacher.train import main as train_main

    root, cfg = setup
    official = root / "official"
    config = {
        "job": "teacher.train",
        "model": {"whisper": {"path": str(official / "whisper"), "freeze": True, "per_clip": True},
                  "beats": {"path": str(official / "beats.pt"), "freeze": True, "padding_features": "zero"},
                  "qformer": {**dataclasses.asdict(cfg.qformer), "trim_to_audio": True},
                  "llm": {"path": str(official / "llm"), "freeze": True},
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"train": [str(root / "train.json")], "valid": [str(root / "train.json")]},
        "features": {"whisper_chunk_seconds": 2},
        "feature_store": str(tmp_path / "features"),
        "encoder_store": str(tmp_path / "encoders"),
        "beats_pretrain": {"steps": 3, "batch_size": 2, "min_clips": 2, "warmup_steps": 1},
        "lm_pretrain": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
        "loop": {"max_steps": 2, "batch_size": 3, "log_every": 1, "eval_every": 100, "save_every": 100},
        "optim": {"lr": 1.0e-3, "warmup_steps": 1},
        "validation": {"max_clips_per_task": 2, "max_new_tokens": 3},
        "output_dir": str(tmp_path / "teacher"),
        "log_dir": str(tmp_path / "runs"),
    }
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(config))
    assert train_main(["--config", str(tmp_path / "teacher.yaml")]) == 0
    folder = tmp_path / "teacher" / "model"
    teacher = load_model_folder(folder)
    original = torch.load(official / "beats.pt", weights_only=True)["model"]
    saved = teacher.audio_encoder.state_dict()
    assert not torch.equal(saved["encoder.layers.0.fc1.weight"], original["encoder.layers.0.fc1.weight"])
    assert "head.weight" not in saved and teacher.audio_encoder.predictor is None  # the tagging head is dropped
    assert teacher.whisper_per_clip  # saved with the model (salmonn.yaml)
    official_llm = read_hf_weights(official / "llm")
    saved_llm = teacher.llm.get_base_model().state_dict()
    assert not torch.equal(saved_llm["model.layers.0.mlp.up_proj.weight"],
                           official_llm["model.layers.0.mlp.up_proj.weight"])  # lm_pretrain trained the base
    whisper = build_salmonn(dataclasses.replace(cfg, checkpoint=""))[0].speech_encoder.state_dict()
    assert all(torch.equal(v, whisper[k]) for k, v in teacher.speech_encoder.state_dict().items())  # frozen
    stores = sorted((tmp_path / "encoders").glob("train-*.safetensors"))
    assert [p.stem.split("-")[1] for p in stores] == [AUDIO_OUT, SPEECH_OUT]  # one file per encoder
    for path, key in zip(stores, (AUDIO_OUT, SPEECH_OUT), strict=True):
        assert path.stem.endswith(teacher.encoder_fingerprint([key]))  # the outputs of the saved encoders
    assert cache_main([f"teacher_folder={folder}", f"data.train=[{root / 'train.json'}]",
                       "features.whisper_chunk_seconds=2", f"feature_store={tmp_path / 'features'}",
                       f"encoder_store={tmp_path / 'encoders'}", "k=4", f"output_dir={tmp_path / 'cache'}"]) == 0
    assert sorted((tmp_path / "encoders").glob("train-*.safetensors")) == stores  # reused, not recomputed
