"""Tiny random checkpoints in each official layout, written by the tests themselves.

- an HF Whisper folder (WhisperForConditionalGeneration.save_pretrained: `model.encoder.*` and a decoder),
- an official BEATs `.pt` (`{"cfg", "model"}`),
- an HF LLaMA folder with a tokenizer that has no pad token (SALMONN adds `[PAD]`),
- a SALMONN `.pth` (`{"model", "optimizer", "config", "scaler", "epoch"}`) with the official key names,
  including the buffers and aliases the real release carries.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperForConditionalGeneration

from common.bpe import train_bpe
from teacher.beats import BEATs, BEATsConfig
from teacher.build import BeatsEncoderConfig, LLMConfig, LoraSpec, SalmonnConfig, WhisperEncoderConfig, build_salmonn
from teacher.checkpoint import salmonn_state_dict, save_model_folder
from teacher.qformer import QFormerConfig

TEXTS = ["the cat sat on the mat", "a high tone followed by three short beeps", "hello world", "the dog runs",
         "USER: <Speech></Speech> Recognize the speech.\nASSISTANT:", "Describe the audio, please."] * 10

BEATS_CFG = dict(input_patch_size=16, embed_dim=16, encoder_layers=2, encoder_embed_dim=24, encoder_ffn_embed_dim=48,
                 encoder_attention_heads=4, conv_pos=16, conv_pos_groups=4, relative_position_embedding=True,
                 gru_rel_pos=True, deep_norm=True, dropout=0.0, attention_dropout=0.0)
QFORMER = QFormerConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, dropout=0.0)


def write_whisper(folder: Path) -> Path:
    torch.manual_seed(1)
    config = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=80,
                           max_source_positions=100, vocab_size=100, max_target_positions=32, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    return folder


def write_beats(path: Path) -> Path:
    torch.manual_seed(2)
    torch.save(BEATs(BEATsConfig.from_dict(BEATS_CFG)).to_checkpoint(), path)
    return path


def write_llama(folder: Path) -> Path:
    torch.manual_seed(3)
    tok = train_bpe(TEXTS, 120, "llama")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_config(root: Path, checkpoint: bool = True) -> SalmonnConfig:
    return SalmonnConfig(
        whisper=WhisperEncoderConfig(path=str(root / "whisper")),
        beats=BeatsEncoderConfig(path=str(root / "beats.pt")),
        qformer=QFORMER,
        llm=LLMConfig(path=str(root / "llm")),
        lora=LoraSpec(r=4, alpha=8, dropout=0.0),
        checkpoint=str(root / "salmonn.pth") if checkpoint else "",
    )


def write_official_layout(root: Path) -> SalmonnConfig:
    """Write all four files under `root` and return the config that loads them."""
    root.mkdir(parents=True, exist_ok=True)
    write_whisper(root / "whisper")
    write_beats(root / "beats.pt")
    write_llama(root / "llm")
    torch.manual_seed(4)
    model, _ = build_salmonn(tiny_config(root, checkpoint=False))
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    state = salmonn_state_dict(model)
    # What the official release carries besides the trained parameters:
    state["speech_Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    state["llama_model.base_model.model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    state["beats.encoder.layers.1.self_attn.relative_attention_bias.weight"] = torch.zeros(320, 4)
    blob = {"model": state, "optimizer": {"state": {}, "param_groups": []}, "config": {"run": {"seed": 42}},
            "scaler": None, "epoch": 3}
    torch.save(blob, root / "salmonn.pth")
    torch.save(model.state_dict(), root / "reference_state.pt")
    return tiny_config(root)


def write_teacher_folder(root: Path) -> Path:
    """The official layout under `root/official`, loaded and saved as a teacher folder `root/teacher`."""
    cfg = write_official_layout(root / "official")
    model, _ = build_salmonn(cfg)
    save_model_folder(model, cfg, root / "teacher")
    return root / "teacher"


def tiny_batch(batch_size: int = 2, seconds: float = 2.0, seed: int = 0) -> dict:
    """A collated batch for the tiny model (Whisper reads 200 mel frames = 2 s)."""
    g = torch.Generator().manual_seed(seed)
    frames = int(seconds * 100) - 2
    return {
        "mel": torch.randn(batch_size, 80, 200, generator=g),
        "fbank": torch.randn(batch_size, frames, 128, generator=g),
        "fbank_padding_mask": torch.zeros(batch_size, frames, dtype=torch.bool),
        "prompts": ["Recognize the speech.", "Describe the audio, please."][:batch_size],
    }
