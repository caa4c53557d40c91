"""GGUF → HF: a tiny random LLaMA written as llama.cpp writes it (gguf.GGUFWriter), converted back.

The test writes the file the way llama.cpp's convert_hf_to_gguf.py does: its tensor names, q/k rows
permuted for its rotary layout, byte-level BPE tokenizer metadata, and Q8_0 blocks packed by hand
(fp16 scale d = max|block| / 127, then 32 int8 values), so a wrong un-permutation, name or dequantization
changes the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, pre_tokenizers
from tokenizers.models import BPE
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from convert import ConversionError
from convert.gguf_llm import convert_gguf_llm, main

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTE_TOKENS = [bytes_to_unicode()[b] for b in range(256)]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "o"), ("Ġ", "lo"), ("Ġlo", "w")]
TOKENS = SPECIALS + BYTE_TOKENS + [a + b for a, b in MERGES]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def tiny_llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # not all ones, so a swapped norm shows
                param.uniform_(0.5, 1.5)
    return model


def permute(weight: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: q/k rows reordered for its rotary layout."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def q8_0(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pack rows into Q8_0 blocks; returns (raw bytes [rows, blocks × 34], the dequantized float32 values)."""
    blocks = weight.astype(np.float32).reshape(-1, 32)
    d = (np.abs(blocks).max(axis=1) / 127).astype(np.float16)
    inverse = np.divide(1.0, d.astype(np.float32), out=np.zeros(len(d), np.float32), where=d != 0)
    q = np.rint(blocks * inverse[:, None]).astype(np.int8)
    raw = np.concatenate([d[:, None].view(np.uint8), q.view(np.uint8)], axis=1)
    dequantized = (q.astype(np.float32) * d.astype(np.float32)[:, None]).reshape(weight.shape)
    return raw.reshape(weight.shape[0], -1), dequantized


def write_gguf(path: Path, model: LlamaForCausalLM, layout: str) -> LlamaForCausalLM:
    """Write `model` as a llama GGUF; layout "f32" or "f16+q8_0" (norms stay F32 as llama.cpp keeps them).

    Returns the model holding exactly the values the file stores (after fp16 / Q8_0 rounding).
    """
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in parts.items()})
    stored = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        value = tensor.numpy()
        to_file = value
        if ".q_proj." in hf_name:
            to_file = permute(value, cfg.num_attention_heads, cfg.num_attention_heads)
        elif ".k_proj." in hf_name:
            to_file = permute(value, cfg.num_attention_heads, cfg.num_key_value_heads)
        # Rounding is per element (F16) or per 32-value block inside a row (Q8_0), and the permutation only
        # reorders rows, so the reference takes the rounded values of the un-permuted matrix.
        if layout == "f32" or value.ndim == 1:
            writer.add_tensor(names[hf_name], to_file.astype(np.float32))
            stored[hf_name] = value.astype(np.float32)
        elif hf_name == "model.embed_tokens.weight":
            writer.add_tensor(names[hf_name], to_file.astype(np.float16))
            stored[hf_name] = value.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(names[hf_name], q8_0(to_file)[0], raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            stored[hf_name] = q8_0(value)[1]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reference = tiny_llama(cfg.tie_word_embeddings)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in stored.items()}, strict=False)
    if cfg.tie_word_embeddings:
        reference.tie_weights()
    return reference


def reference_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(BPE(vocab={t: i for i, t in enumerate(TOKENS)}, merges=MERGES))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    return tokenizer


def logits(model, seed=1):
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("layout,tied", [("f32", True), ("f16+q8_0", False)])
def test_gguf_converts_to_a_plain_folder_with_the_same_logits(tmp_path, layout, tied):
    reference = write_gguf(tmp_path / "tiny.gguf", tiny_llama(tied), layout)
    assert main(["--gguf", str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "hf")]) == 0

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is tied
    converted, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(converted) is LlamaForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in reference.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name
    torch.testing.assert_close(logits(converted.eval()), logits(reference), rtol=0, atol=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    for text in (" the low", "hello there<|im_end|>", " lower the"):
        assert tokenizer(text).input_ids == reference_tokenizer().encode(text).ids
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


def test_q8_0_values_are_the_blocks_scale_times_int8():
    """The packing helper itself: values are reproduced block by block from scale and int8."""
    weight = np.arange(64, dtype=np.float32).reshape(1, 64) - 20
    raw, values = q8_0(weight)
    d = raw[0, :2].view(np.float16)[0]
    assert float(d) == pytest.approx(20 / 127, rel=1e-3)
    assert np.array_equal(values[0, :32], raw[0, 2:34].view(np.int8).astype(np.float32) * np.float32(d))
    assert np.abs(values - weight).max() <= 43 / 127 / 2 + 1e-2


def test_bad_gguf_files_are_named(tmp_path, capsys):
    write_gguf(tmp_path / "tiny.gguf", tiny_llama(True), "f32")
    blob = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(blob[: len(blob) - 100])
    with pytest.raises(ConversionError, match=r"cut.gguf: .*truncated"):
        convert_gguf_llm(tmp_path / "cut.gguf", tmp_path / "out")
    (tmp_path / "cut.gguf").write_bytes(blob[:300])
    with pytest.raises(ConversionError, match=r"cut.gguf: .*truncated"):
        convert_gguf_llm(tmp_path / "cut.gguf", tmp_path / "out")
    (tmp_path / "notgguf.gguf").write_bytes(b"PK\x03\x04" + blob[4:])
    with pytest.raises(ConversionError, match="not a GGUF file"):
        convert_gguf_llm(tmp_path / "notgguf.gguf", tmp_path / "out")
    with pytest.raises(ConversionError, match="GGUF file not found"):
        convert_gguf_llm(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    assert main(["--gguf", str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "out")]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
