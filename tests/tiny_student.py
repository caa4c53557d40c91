"""A tiny random student built in-process (no teacher needed), a saved student folder of it, and a few audio clips.

The student has the real parts at toy widths: a Whisper encoder (d 32, 4 heads of 8, MLP 64, 2 layers), BEATs with
token pruning (d 24, MLP 48), the window-level Q-Former, and a Gemma-2 LLM with GQA (hidden 32, MLP 64, 4 query
heads / 2 KV heads of 8, 2 layers, tied embeddings) with its own byte-level BPE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tiny_salmonn import BEATS_CFG, QFORMER, TEXTS, tiny_batch

from common.bpe import train_bpe
from common.dataset import AudioTextCollator
from student.build import save_student_folder
from student.token_pruning import PrunedBEATs, TokenPruningConfig
from teacher.build import BeatsEncoderConfig, LLMConfig, LoraSpec, SalmonnConfig, WhisperEncoderConfig, build_salmonn


def tiny_student_config(root: Path) -> SalmonnConfig:
    tokenizer = root / "student_tok"
    if not (tokenizer / "tokenizer.json").is_file():
        train_bpe(TEXTS, 150, "bytelevel").save_pretrained(tokenizer)
    return SalmonnConfig(
        whisper=WhisperEncoderConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                                     num_mel_bins=80, max_source_positions=100, freeze=False),
        beats=BeatsEncoderConfig(cfg=dict(BEATS_CFG), freeze=False),
        qformer=QFORMER,
        llm=LLMConfig(tokenizer=str(tokenizer), architecture="gemma2", hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=256, tie_word_embeddings=True, freeze=False),
        lora=LoraSpec(enabled=False),
    )


def build_tiny_student(root: Path, seed: int = 0):
    """(model, its SalmonnConfig): fresh random parts, BEATs keeping half its tokens after layer 0, eval mode."""
    cfg = tiny_student_config(root)
    torch.manual_seed(seed)
    model, _ = build_salmonn(cfg)
    model.audio_encoder = PrunedBEATs.from_beats(
        model.audio_encoder, TokenPruningConfig(keep_ratio=0.5, prune_after_layers=[0], merge="fuse"))
    with torch.no_grad():  # Gemma's RMSNorm weights start at 0 (scale 1 + w); make them matter
        for name, p in model.llm.named_parameters():
            if "norm" in name:
                p.normal_(std=0.1)
    return model.eval(), cfg


def write_student_folder(root: Path, seed: int = 0) -> Path:
    model, cfg = build_tiny_student(root, seed)
    return save_student_folder(model, cfg, root / "student")


def outputs(model, batch: dict):
    """What a reload must reproduce: the audio embeddings `[batch, tokens, d]` and the prefill's last logits."""
    with torch.no_grad():
        audio = model.encode_audio(batch)
        return audio, model.prefill(audio, batch["prompts"])[0]


def training_batch(model, seed: int = 0) -> dict:
    """`tiny_batch` plus references tokenized with the model's tokenizer (teacher forcing)."""
    batch = tiny_batch(seed=seed)
    batch["mel_frames"] = torch.tensor([200, 200])
    batch["texts"] = ["the cat sat on the mat", "a high tone followed by three short beeps"]
    batch["target_ids"], batch["labels"] = AudioTextCollator(model.tokenizer).tokenize_targets(batch["texts"])
    return batch


def write_clips(root: Path, count: int = 6) -> Path:
    """`count` short noise clips (0.6–1.1 s) with texts, as SALMONN annotation JSON; returns its path."""
    rng = np.random.default_rng(0)
    texts = ["the cat sat on the mat", "hello world", "the dog runs", "a high tone followed by three short beeps"]
    entries = []
    for i in range(count):
        sf.write(root / f"clip{i}.wav", (0.3 * rng.standard_normal(9600 + 800 * i)).astype(np.float32), 16000)
        entries.append({"path": f"clip{i}.wav", "text": texts[i % 4], "task": "asr" if i % 2 else "audiocaption"})
    path = root / "clips.json"
    path.write_text(json.dumps({"annotation": entries}))
    return path
