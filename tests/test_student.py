"""The student built from the teacher: layer selection, weight copies, token pruning, save/load."""

import pytest
import torch
from tiny_salmonn import TEXTS, tiny_batch, write_teacher_folder

from student.build import (
    StudentConfig,
    build_student,
    distill_whisper_encoder,
    ensure_student_tokenizer,
    load_student_folder,
    save_student_folder,
    select_layers,
)
from student.token_pruning import PrunedBEATs, TokenPruningConfig
from teacher.build import LLMConfig, audio_scale, load_whisper_encoder
from teacher.checkpoint import load_model_folder
from teacher.salmonn import AUDIO_OUT

torch.set_num_threads(1)


def test_select_layers_is_distil_whispers_rule():
    assert select_layers(32, 2) == [0, 31]
    assert select_layers(4, 2) == [0, 3]
    assert select_layers(12, 4) == [0, 3, 7, 11]
    assert select_layers(32, 4) == [0, 10, 20, 31]
    assert select_layers(4, 1) == [3]
    with pytest.raises(ValueError):
        select_layers(4, 5)


def test_select_first_layers_keeps_the_teachers_hidden_state_at_that_depth(tmp_path):
    """`whisper_layer_selection: first` (a frozen student Whisper): layers 0..k-1 in order, so the student's output
    is the teacher's hidden state after layer k under the teacher's final norm, exactly (same weights, same ops)."""
    assert select_layers(6, 2, "first") == [0, 1] and select_layers(4, 1, "first") == [0]
    with pytest.raises(ValueError, match="spaced or first"):
        select_layers(4, 2, "last")
    write_teacher_folder(tmp_path)
    teacher = load_whisper_encoder(tmp_path / "official" / "whisper").eval()
    assert teacher.config.encoder_layers >= 2  # so that "first" and "spaced" differ
    student = distill_whisper_encoder(teacher, select_layers(teacher.config.encoder_layers, 1, "first")).eval()
    mel = tiny_batch()["mel"]
    with torch.no_grad():
        depth_one = teacher.layer_norm(teacher(mel, output_hidden_states=True).hidden_states[1])
        torch.testing.assert_close(student(mel).last_hidden_state, depth_one, rtol=0, atol=0)


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("student")
    write_teacher_folder(root)
    return root


def student_cfg(root, keep=0.5):
    return StudentConfig(
        whisper_layers=1,
        token_pruning=TokenPruningConfig(keep_ratio=keep, prune_after_layers=[0], score="attention", merge="fuse"),
        llm=LLMConfig(tokenizer=str(root / f"student_tok_{keep}"), architecture="gemma2", hidden_size=24,
                      intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=12, tie_word_embeddings=True, freeze=False),
    )


def test_distilled_whisper_copies_the_chosen_layers(teacher_folder):
    teacher = load_whisper_encoder(teacher_folder / "official" / "whisper")
    student = distill_whisper_encoder(teacher, [1])
    assert student.config.encoder_layers == 1
    for key, value in student.state_dict().items():
        source = key.replace("layers.0.", "layers.1.") if key.startswith("layers.") else key
        torch.testing.assert_close(value, teacher.state_dict()[source], rtol=0, atol=0, msg=key)


def test_student_from_teacher_and_roundtrip(teacher_folder, tmp_path):
    root = teacher_folder
    cfg = student_cfg(root)
    ensure_student_tokenizer(cfg, TEXTS)
    student, salmonn_cfg = build_student(cfg, root / "teacher")
    teacher = load_model_folder(root / "teacher")
    assert isinstance(student.audio_encoder, PrunedBEATs)
    assert student.whisper_layers_from_teacher == [1]
    assert student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab()
    for name, value in teacher.qformer.state_dict().items():
        torch.testing.assert_close(student.qformer.state_dict()[name], value, rtol=0, atol=0)
    torch.testing.assert_close(student.ln_speech.weight, teacher.ln_speech.weight)
    assert student.projector.out_features == 24
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(student.speech_encoder) < n(teacher.speech_encoder)
    student.eval()
    batch = tiny_batch()
    with torch.no_grad():
        tokens = student.encode_audio(batch)
    assert tokens.shape == (2, 5, 24)  # same windows as the teacher: pruned BEATs tokens return to their positions
    # the same BEATs weights, other outputs: a store of the teacher's BEATs outputs must not serve the student
    assert student.encoder_fingerprint([AUDIO_OUT]) != teacher.encoder_fingerprint([AUDIO_OUT])
    save_student_folder(student, salmonn_cfg, tmp_path / "student")
    again = load_student_folder(tmp_path / "student")
    assert isinstance(again.audio_encoder, PrunedBEATs) and again.audio_encoder.pruning_config.keep_ratio == 0.5
    with torch.no_grad():
        torch.testing.assert_close(again.encode_audio(batch), tokens)
        a, _ = student.prefill(tokens, batch["prompts"])
        b, _ = again.prefill(tokens, batch["prompts"])
        torch.testing.assert_close(a, b)


def test_student_of_a_per_clip_teacher_reads_each_clip_alone_unless_told_otherwise(tmp_path):
    """A teacher whose Whisper runs on each clip alone (`whisper.per_clip`, the quick preset's) gives a student that
    does the same, saved with it; `whisper_pad_to_longest` set explicitly overrides it."""
    import dataclasses

    import yaml
    from tiny_salmonn import write_official_layout

    from teacher.build import build_salmonn
    from teacher.checkpoint import read_model_config, save_model_folder

    cfg = write_official_layout(tmp_path / "official")
    cfg = dataclasses.replace(cfg, whisper=dataclasses.replace(cfg.whisper, per_clip=True))
    model, _ = build_salmonn(cfg)
    save_model_folder(model, cfg, tmp_path / "teacher")
    assert read_model_config(tmp_path / "teacher").whisper.per_clip
    student_config = student_cfg(tmp_path)
    ensure_student_tokenizer(student_config, TEXTS)
    student, salmonn_cfg = build_student(student_config, tmp_path / "teacher")
    assert student.whisper_per_clip and salmonn_cfg.whisper.per_clip
    save_student_folder(student, salmonn_cfg, tmp_path / "student")
    assert yaml.safe_load((tmp_path / "student" / "salmonn.yaml").read_text())["whisper"]["per_clip"] is True
    assert load_student_folder(tmp_path / "student").whisper_per_clip
    padded = dataclasses.replace(student_config, whisper_pad_to_longest=True)
    student, salmonn_cfg = build_student(padded, tmp_path / "teacher")
    assert not student.whisper_per_clip and student.pad_to_longest and not salmonn_cfg.whisper.per_clip


def test_unscale_audio_cancels_gemmas_embedding_scale_and_is_saved_with_the_student(teacher_folder, tmp_path):
    """Gemma multiplies its input embeddings by sqrt(hidden_size); `llm.unscale_audio` divides the projected audio
    tokens by it first (PaliGemma's rule), and a student saved that way loads back that way."""
    import dataclasses

    root = teacher_folder
    plain = student_cfg(root)
    ensure_student_tokenizer(plain, TEXTS)
    unscaled = dataclasses.replace(plain, llm=dataclasses.replace(plain.llm, unscale_audio=True))
    batch = tiny_batch()
    tokens = {}
    for name, cfg in (("plain", plain), ("unscaled", unscaled)):
        torch.manual_seed(0)
        student, salmonn_cfg = build_student(cfg, root / "teacher")
        with torch.no_grad():
            tokens[name] = student.eval().encode_audio(batch)
        save_student_folder(student, salmonn_cfg, tmp_path / name)
    assert student.audio_scale == pytest.approx(24**-0.5)  # hidden_size 24
    torch.testing.assert_close(tokens["unscaled"], tokens["plain"] / 24**0.5)
    with torch.no_grad():
        torch.testing.assert_close(load_student_folder(tmp_path / "unscaled").encode_audio(batch), tokens["unscaled"])
    assert load_student_folder(tmp_path / "plain").audio_scale == 1.0  # the default: as before
    teacher = load_model_folder(root / "teacher")  # a LLaMA: no embedding scale to cancel
    assert teacher.llm.config.model_type == "llama" and teacher.audio_scale == 1.0
    assert audio_scale(LLMConfig(unscale_audio=True), teacher.llm) == 1.0
