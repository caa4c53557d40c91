"""SALMONN from official-layout checkpoints: loaders, key report, windowing, prompt wrapping, generation."""

import dataclasses

import pytest
import torch
from tiny_salmonn import (
    QFORMER,
    tiny_batch,
    tiny_config,
    write_beats,
    write_llama,
    write_official_layout,
    write_whisper,
)
from torch import nn

from common.dataset import AudioTextCollator
from teacher.build import CheckpointError, build_salmonn, load_whisper_encoder
from teacher.checkpoint import load_model_folder, save_model_folder
from teacher.inspect import main as inspect_main
from teacher.official import official_to_ours, ours_to_official
from teacher.qformer import QFormerConfig, WindowQFormer, num_windows, split_windows
from teacher.salmonn import crop_mel, run_whisper_encoder, whisper_any_length

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    return root, write_official_layout(root)


def test_loads_every_official_layout_and_reports_keys(official):
    root, cfg = official
    model, report = build_salmonn(cfg)
    assert report.missing_trained == [] and report.unexpected == []
    assert sorted(report.recomputed) == ["llama_model.base_model.model.model.layers.0.self_attn.rotary_emb.inv_freq",
                                         "speech_Qformer.bert.embeddings.position_ids"]
    assert report.from_own_files == ["beats.encoder.layers.1.self_attn.relative_attention_bias.weight"]
    assert any(k.endswith("lora_A.default.weight") for k in report.loaded)
    # [PAD] was added to the LLaMA tokenizer and the embeddings resized before LoRA.
    assert model.tokenizer.pad_token == "[PAD]"
    assert model.llm.get_input_embeddings().weight.shape[0] == len(model.tokenizer)
    reference = torch.load(root / "reference_state.pt", weights_only=True)
    state = model.state_dict()
    for key, tensor in reference.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0, msg=key)


def test_whisper_loader_reads_encoder_only(official):
    root, _ = official
    encoder = load_whisper_encoder(root / "whisper")
    assert encoder.config.d_model == 32 and encoder.embed_positions.weight.shape == (100, 32)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_whisper_encoder(root / "nowhere")


def test_missing_trained_key_fails_inspect(official, tmp_path, capsys):
    root, cfg = official
    blob = torch.load(root / "salmonn.pth", weights_only=True)
    del blob["model"]["speech_llama_proj.weight"]
    blob["model"]["speech_Qformer.some_new_thing"] = torch.zeros(1)
    torch.save(blob, tmp_path / "broken.pth")
    args = [f"model.whisper.path={cfg.whisper.path}", f"model.beats.path={cfg.beats.path}",
            f"model.llm.path={cfg.llm.path}", "model.qformer.hidden_size=32", "model.qformer.num_attention_heads=4",
            "model.qformer.intermediate_size=64", "model.lora.r=4", "model.lora.alpha=8"]
    assert inspect_main(args + [f"model.checkpoint={root / 'salmonn.pth'}"]) == 0
    assert inspect_main(args + [f"model.checkpoint={tmp_path / 'broken.pth'}"]) == 1
    out = capsys.readouterr().out
    assert "missing: projector.weight" in out and "unexpected: speech_Qformer.some_new_thing" in out
    assert "qformer_projector" in out and "speech_encoder" in out


def test_key_mapping_roundtrip():
    official = "speech_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"
    ours = official_to_ours(official)
    assert ours == "qformer.qformer.encoder.layer.1.crossattention.attention.key.weight"
    assert ours_to_official(ours) == official
    assert official_to_ours("speech_Qformer.bert.embeddings.LayerNorm.bias") == "qformer.qformer.layernorm.bias"
    lora = "llama_model.base_model.model.model.layers.3.self_attn.v_proj.lora_B.default.weight"
    assert ours_to_official(official_to_ours(lora)) == lora


def test_qformer_windows_88_for_30_seconds():
    cfg = QFormerConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64)
    assert num_windows(1500, cfg) == 88
    qformer = WindowQFormer(cfg, encoder_dim=12)
    assert qformer(torch.randn(2, 1500, 12)).shape == (2, 88, 32)
    x = torch.arange(2 * 40 * 3, dtype=torch.float).reshape(2, 40, 3)
    windows = split_windows(x, kernel=17, stride=17)
    assert windows.shape == (4, 17, 3)
    torch.testing.assert_close(windows[1], x[0, 17:34])
    torch.testing.assert_close(windows[2], x[1, :17])


def test_pool_qformer_is_multi_head_attention_per_window():
    """`kind: pool` is one multi-head cross-attention of the query over its window and a layer norm: it agrees with
    torch's nn.MultiheadAttention given the same weights, and each output depends on its own window only."""
    torch.manual_seed(0)
    cfg = QFormerConfig(kind="pool", hidden_size=32, num_attention_heads=4, dropout=0.0)
    qformer = WindowQFormer(cfg, encoder_dim=12).eval()
    assert not hasattr(qformer, "qformer")
    features = torch.randn(2, 40, 12)  # 2 windows of 17 frames per row (6 frames left over)
    out = qformer(features)
    assert out.shape == (2, 2, 32)
    pool = qformer.pool
    reference = nn.MultiheadAttention(32, 4, kdim=12, vdim=12, batch_first=True)
    with torch.no_grad():
        reference.q_proj_weight.copy_(pool.q_proj.weight)
        reference.k_proj_weight.copy_(pool.k_proj.weight)
        reference.v_proj_weight.copy_(pool.v_proj.weight)
        reference.in_proj_bias.copy_(torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]))
        reference.out_proj.load_state_dict(pool.out_proj.state_dict())
        window = features[1:, 17:34]
        expected, _ = reference(qformer.query_tokens, window, window)
        # float32 attention written two ways (SDPA vs torch's fused path): rounding differences of ~1e-6
        torch.testing.assert_close(out[1:, 1:], pool.norm(expected), atol=1e-5, rtol=1e-5)
        changed = features.clone()
        changed[0, :17] += 1.0  # row 0's first window only
        moved = qformer(changed) - out
    assert moved[0, 0].abs().max() > 1e-3
    assert moved[0, 1].abs().max() == 0 and moved[1].abs().max() == 0
    with pytest.raises(ValueError, match="qformer.kind"):
        WindowQFormer(QFormerConfig(kind="perceiver", hidden_size=32, num_attention_heads=4), encoder_dim=12)


def test_pool_qformer_survives_the_official_layout(tmp_path):
    """A toy teacher with `kind: pool` writes its pool under `speech_Qformer.pool.*` and loads it back unchanged."""
    assert official_to_ours("speech_Qformer.pool.k_proj.weight") == "qformer.pool.k_proj.weight"
    assert ours_to_official("qformer.pool.k_proj.weight") == "speech_Qformer.pool.k_proj.weight"
    root = tmp_path / "parts"
    root.mkdir()
    write_whisper(root / "whisper")
    write_beats(root / "beats.pt")
    write_llama(root / "llm")
    cfg = dataclasses.replace(tiny_config(root, checkpoint=False),
                              qformer=dataclasses.replace(QFORMER, kind="pool"))
    torch.manual_seed(1)
    model, _ = build_salmonn(cfg)
    save_model_folder(model, cfg, tmp_path / "teacher")
    again = load_model_folder(tmp_path / "teacher")
    assert again.qformer.cfg.kind == "pool"
    model.eval()
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(again.encode_audio(batch), model.encode_audio(batch))


def test_zero_ln_audio_gain_starts_as_whisper_alone_and_opens(tmp_path):
    """`beats.ln_gain_init: 0` makes a fresh teacher's joined features zero in BEATs' channels (so its first steps
    are those of a Whisper-only teacher), and the gains get a gradient at once, so training can open them."""
    root = tmp_path / "parts"
    root.mkdir()
    write_whisper(root / "whisper")
    write_beats(root / "beats.pt")
    write_llama(root / "llm")
    base = tiny_config(root, checkpoint=False)
    cfg = dataclasses.replace(base, beats=dataclasses.replace(base.beats, ln_gain_init=0.0))
    torch.manual_seed(1)
    model, _ = build_salmonn(cfg)
    assert model.ln_audio.weight.abs().max() == 0 and model.ln_audio.weight.requires_grad
    batch = tiny_batch()
    joined = model.join_encoders(batch)
    d_whisper = model.speech_encoder.config.d_model
    assert joined[..., d_whisper:].abs().max() == 0 and joined[..., :d_whisper].abs().max() > 0
    (model.encode_audio(batch) * torch.randn(model.encode_audio(batch).shape)).sum().backward()
    assert model.ln_audio.weight.grad.abs().max() > 0
    torch.manual_seed(1)
    default, _ = build_salmonn(base)  # the default keeps LayerNorm's unit gain
    assert torch.equal(default.ln_audio.weight, torch.ones_like(default.ln_audio.weight))


def test_prompt_wrapping_and_label_masking(official):
    _, cfg = official
    model, _ = build_salmonn(cfg)
    model.eval()
    batch = tiny_batch()
    batch["target_ids"], batch["labels"] = AudioTextCollator(model.tokenizer).tokenize_targets(["the cat", "hello"])
    out = model(batch)
    tok = model.tokenizer
    before, after = model.prompt_ids("Recognize the speech.")
    assert before[0] == tok.bos_token_id
    assert tok.decode(before[1:]) == "USER: <Speech>"
    assert tok.decode(after).startswith("</Speech> Recognize the speech.") and tok.decode(after).endswith("ASSISTANT:")
    audio_tokens = num_windows(100, cfg.qformer)  # 200 mel frames -> 100 encoder frames -> 5 windows of 17
    assert audio_tokens == 5
    n_prompt = len(before) + audio_tokens + len(after)
    labels = out.labels[0]
    assert (labels[:n_prompt] == -100).all()
    target = tok("the cat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels[n_prompt : n_prompt + len(target)].tolist() == target
    assert (labels[n_prompt + len(target) :] == -100).all() and out.attention_mask[0].sum() == n_prompt + len(target)
    assert out.qformer_out.shape == (2, audio_tokens, 32)
    assert torch.isfinite(out.loss)


def test_generation_and_cached_decoding_agree(official):
    _, cfg = official
    model, _ = build_salmonn(cfg)
    model.eval()
    batch = tiny_batch()
    texts = model.generate(batch, batch["prompts"], max_new_tokens=6)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # Greedy decoding through prefill + decode_step gives the same tokens as HF generate, row by row.
    for row in range(2):
        single = {k: v[row : row + 1] if torch.is_tensor(v) else v[row : row + 1] for k, v in batch.items()}
        with torch.no_grad():
            logits, cache = model.prefill(model.encode_audio(single), single["prompts"])
            ids = []
            for _ in range(6):
                token = logits.argmax(-1, keepdim=True)
                if token.item() == model.tokenizer.eos_token_id:
                    break
                ids.append(token.item())
                logits, cache = model.decode_step(token, cache)
        assert model.tokenizer.decode(ids, skip_special_tokens=True).strip() == texts[row]
    beams = model.generate(batch, batch["prompts"], max_new_tokens=4, num_beams=3, repetition_penalty=1.3)
    assert len(beams) == 2


def test_batched_prefill_matches_single(official):
    _, cfg = official
    model, _ = build_salmonn(cfg)
    model.eval()
    batch = tiny_batch()
    with torch.no_grad():
        logits, _ = model.prefill(model.encode_audio(batch), batch["prompts"])
        for row in range(2):
            single = {k: v[row : row + 1] if torch.is_tensor(v) else v[row : row + 1] for k, v in batch.items()}
            alone, _ = model.prefill(model.encode_audio(single), single["prompts"])
            torch.testing.assert_close(logits[row : row + 1], alone, atol=1e-4, rtol=1e-4)


def test_model_folder_roundtrip(official, tmp_path):
    _, cfg = official
    model, _ = build_salmonn(cfg)
    save_model_folder(model, cfg, tmp_path / "teacher")
    again = load_model_folder(tmp_path / "teacher")
    model.eval()
    batch = tiny_batch()
    with torch.no_grad():
        a = model.encode_audio(batch)
        b = again.encode_audio(batch)
        torch.testing.assert_close(a, b)
        la, _ = model.prefill(a, batch["prompts"])
        lb, _ = again.prefill(b, batch["prompts"])
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)


def test_whisper_any_length_matches_hf_and_crops(official):
    root, _ = official
    encoder = load_whisper_encoder(root / "whisper").eval()
    mel = torch.randn(2, 80, 200)
    with torch.no_grad():
        torch.testing.assert_close(whisper_any_length(encoder, mel), encoder(mel).last_hidden_state)
        assert run_whisper_encoder(encoder, mel[..., :120]).shape == (2, 60, 32)
    with pytest.raises(ValueError, match="must be even"):
        whisper_any_length(encoder, mel[..., :121])
    batch = {"mel": mel, "mel_frames": torch.tensor([37, 90])}
    assert crop_mel(batch).shape[-1] == 90
    batch["mel_frames"] = torch.tensor([37, 91])
    assert crop_mel(batch).shape[-1] == 92
