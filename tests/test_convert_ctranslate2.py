"""CTranslate2 Whisper → HF: tiny random Whisper models written in CTranslate2's layout, converted back.

The writer here follows the model.bin format description (ctranslate2/specs/model_spec.py, `_serialize`) and
the fusing of ctranslate2's own WhisperLoader (q/k/v rows concatenated, a zero k bias, projection aliased to
the embeddings, int8 rows scaled by 127 / max|row|); it shares no code with the reader under test.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import AutoTokenizer, WhisperConfig, WhisperForConditionalGeneration
from transformers.convert_slow_tokenizer import bytes_to_unicode

from convert import ConversionError
from convert.bpe_from_vocab import bpe_merges
from convert.ctranslate2_bin import read_model_bin
from convert.ctranslate2_whisper import convert_ct2_whisper, main

# --- a tiny Whisper vocabulary: 256 byte tokens, 8 merges, Whisper's special tokens, 3 timestamps ---
BYTE_TOKENS = [bytes_to_unicode()[b] for b in range(256)]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "o"), ("Ġ", "lo"), ("Ġlo", "w"), ("e", "r"), ("Ġlow", "er")]
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
TIMESTAMPS = ["<|0.00|>", "<|0.02|>", "<|0.04|>"]
VOCAB = BYTE_TOKENS + [a + b for a, b in MERGES] + SPECIALS + TIMESTAMPS
EOT, SOT = VOCAB.index("<|endoftext|>"), VOCAB.index("<|startoftranscript|>")

TYPE_IDS = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
            np.dtype("float16"): 4}


def reference_tokenizer() -> Tokenizer:
    """The tokenizer the vocabulary was made from (known merges), as the Hub's Whisper tokenizer.json holds it."""
    tokenizer = Tokenizer(BPE(vocab={t: i for i, t in enumerate(VOCAB[:EOT + 1])}, merges=MERGES))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    return tokenizer


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=len(VOCAB), d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=40, num_mel_bins=8,
        max_source_positions=6, max_target_positions=10, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT,
        decoder_start_token_id=SOT, begin_suppress_tokens=[EOT],
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # random biases and norms too, so a swapped or dropped tensor changes the output
        for name, param in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                param.normal_(0, 0.5)
    return model


def quantize_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CTranslate2's int8 scheme: per output row, scale = 127 / max|row| (1 for an all-zero row),
    value = rint(weight × scale)."""
    rows = weight.reshape(weight.shape[0], -1)
    amax = np.abs(rows).max(axis=1)
    amax[amax == 0] = 127.0
    scale = (127.0 / amax).astype(np.float32)
    return np.rint(rows * scale[:, None]).astype(np.int8).reshape(weight.shape), scale


def ct2_variables(model: WhisperForConditionalGeneration, dtype=np.float32, int8: bool = False):
    """CTranslate2 WhisperSpec variables and aliases for an HF Whisper, as ct2-transformers-converter makes them."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}

    def weight(name, value, quantizable=True):
        if int8 and quantizable:
            out[name], out[name + "_scale"] = quantize_int8(value)
        else:
            out[name] = value.astype(dtype)

    def linear(ct2, hf):
        weight(f"{ct2}/weight", sd[f"{hf}.weight"])
        if f"{hf}.bias" in sd:
            out[f"{ct2}/bias"] = sd[f"{hf}.bias"].astype(dtype)

    def fused(ct2, hfs):
        weight(f"{ct2}/weight", np.concatenate([sd[f"{h}.weight"] for h in hfs]))
        biases = [sd.get(f"{h}.bias", np.zeros(sd[f"{h}.weight"].shape[0], np.float32)) for h in hfs]
        out[f"{ct2}/bias"] = np.concatenate(biases).astype(dtype)

    def norm(ct2, hf):
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = sd[f"{hf}.weight"].astype(dtype), sd[f"{hf}.bias"].astype(dtype)

    cfg = model.config
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    for side in ("encoder", "decoder"):
        out[f"{side}/position_encodings/encodings"] = sd[f"model.{side}.embed_positions.weight"].astype(dtype)
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
    for i in range(cfg.encoder_layers):
        ct2, hf = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        fused(f"{ct2}/self_attention/linear_0", [f"{hf}.self_attn.{p}_proj" for p in "qkv"])
        linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
        norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
    for i in range(cfg.decoder_layers):
        ct2, hf = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        fused(f"{ct2}/self_attention/linear_0", [f"{hf}.self_attn.{p}_proj" for p in "qkv"])
        linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
        fused(f"{ct2}/attention/linear_1", [f"{hf}.encoder_attn.{p}_proj" for p in "kv"])
        linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
        norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
        norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
    weight("decoder/embeddings/weight", sd["model.decoder.embed_tokens.weight"])
    scalars = {"encoder/num_heads": np.int16(cfg.encoder_attention_heads),
               "decoder/num_heads": np.int16(cfg.decoder_attention_heads), "decoder/activation": np.int8(3),
               "decoder/pre_norm": np.int8(1), "decoder/scale_embeddings": np.int8(0), "decoder/alibi": np.int8(0),
               "decoder/start_from_zero_embedding": np.int8(0), "decoder/alignment_layer": np.int16(-1),
               "decoder/alignment_heads": np.int16(1)}
    out.update({k: np.array(v) for k, v in scalars.items()})
    return out, {"decoder/projection/weight": "decoder/embeddings/weight"}


def model_bin_bytes(variables, aliases, spec="WhisperSpec", revision=3, version=6) -> bytes:
    def string(text):
        raw = text.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    blob = [struct.pack("<I", version), string(spec), struct.pack("<I", revision), struct.pack("<I", len(variables))]
    for name in sorted(variables):
        array = np.ascontiguousarray(variables[name])
        blob += [string(name), struct.pack("<B", array.ndim), *(struct.pack("<I", d) for d in array.shape),
                 struct.pack("<B", TYPE_IDS[array.dtype]), struct.pack("<I", array.nbytes), array.tobytes()]
    blob.append(struct.pack("<I", len(aliases)))
    blob += [string(alias) + string(target) for alias, target in sorted(aliases.items())]
    return b"".join(blob)


def write_ct2_folder(folder: Path, model, dtype=np.float32, int8=False, tokenizer_json=True,
                     vocab_format="txt") -> Path:
    """A faster-whisper style folder: model.bin, config.json, vocabulary, optionally tokenizer.json."""
    folder.mkdir(parents=True, exist_ok=True)
    variables, aliases = ct2_variables(model, dtype, int8)
    (folder / "model.bin").write_bytes(model_bin_bytes(variables, aliases))
    config = {"suppress_ids": [VOCAB.index("Ġt")], "suppress_ids_begin": [256, EOT],
              "lang_ids": [VOCAB.index("<|en|>"), VOCAB.index("<|de|>")], "alignment_heads": [[1, 0], [1, 2]]}
    (folder / "config.json").write_text(json.dumps(config))
    if vocab_format == "txt":
        (folder / "vocabulary.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    else:
        (folder / "vocabulary.json").write_text(json.dumps(VOCAB), encoding="utf-8")
    if tokenizer_json:
        reference_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def model():
    return tiny_whisper()


def logits(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    cfg = model.config
    features = torch.randn(2, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=generator)
    tokens = torch.randint(0, cfg.vocab_size, (2, 7), generator=generator)
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=tokens).logits


@pytest.mark.parametrize("tokenizer_json,vocab_format", [(True, "txt"), (False, "json")])
def test_float32_roundtrip_gives_every_tensor_and_the_logits(tmp_path, model, tokenizer_json, vocab_format):
    ct2 = write_ct2_folder(tmp_path / "ct2", model, tokenizer_json=tokenizer_json, vocab_format=vocab_format)
    assert main(["--model-dir", str(ct2), "--out", str(tmp_path / "hf")]) == 0
    converted, info = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = model.state_dict()
    for name, tensor in converted.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert torch.equal(logits(converted.eval()), logits(model))

    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["decoder_start_token_id"] == SOT and gen["eos_token_id"] == EOT
    assert gen["no_timestamps_token_id"] == VOCAB.index("<|notimestamps|>")
    assert gen["suppress_tokens"] == [VOCAB.index("Ġt")] and gen["begin_suppress_tokens"] == [256, EOT]
    assert gen["alignment_heads"] == [[1, 0], [1, 2]] and gen["is_multilingual"] is False

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(tokenizer) == len(VOCAB)  # timestamps added, so every model id decodes
    reference = reference_tokenizer()
    for text in (" the lower low", "hello there", " lower"):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode([VOCAB.index(" lower".replace(" ", "Ġ")), VOCAB.index("<|0.02|>")]) == " lower"
    assert tokenizer.convert_ids_to_tokens(tokenizer.all_special_ids[-1]) == "<|notimestamps|>"
    assert json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())["feature_size"] == 8


def test_float16_and_int8_files_dequantize_exactly(tmp_path, model):
    original = model.state_dict()
    write_ct2_folder(tmp_path / "f16", model, dtype=np.float16)
    convert_ct2_whisper(tmp_path / "f16", tmp_path / "hf16")
    converted = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf16").state_dict()
    for name, tensor in converted.items():
        assert torch.equal(tensor, original[name].half().float()), name

    write_ct2_folder(tmp_path / "i8", model, int8=True)
    convert_ct2_whisper(tmp_path / "i8", tmp_path / "hf8")
    converted = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf8").state_dict()
    for name in ("model.encoder.conv1.weight", "model.decoder.layers.1.fc2.weight", "proj_out.weight"):
        source = original["model.decoder.embed_tokens.weight" if name == "proj_out.weight" else name].numpy()
        values, scale = quantize_int8(source)
        expected = values.reshape(len(scale), -1).astype(np.float32) / scale[:, None]
        assert np.array_equal(converted[name].numpy().reshape(len(scale), -1), expected), name
    q = converted["model.encoder.layers.1.self_attn.q_proj.weight"]
    assert (q - original["model.encoder.layers.1.self_attn.q_proj.weight"]).abs().max() < q.abs().max() / 127
    assert not torch.equal(q, original["model.encoder.layers.1.self_attn.q_proj.weight"])


def test_rebuilt_merges_are_the_ones_the_vocabulary_was_made_with():
    assert bpe_merges(VOCAB[:EOT], Path("vocab")) == MERGES


def test_reader_reports_header_and_aliases(tmp_path, model):
    write_ct2_folder(tmp_path, model)
    weights = read_model_bin(tmp_path / "model.bin")
    assert (weights.binary_version, weights.spec, weights.revision) == (6, "WhisperSpec", 3)
    assert weights.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert weights.variables["decoder/projection/weight"] is weights.variables["decoder/embeddings/weight"]
    heads = weights.variables["encoder/num_heads"]
    assert heads.dtype == torch.int16 and int(heads) == 2


def test_truncated_or_doubled_model_bin_is_named(tmp_path, model):
    folder = write_ct2_folder(tmp_path, model)
    blob = (folder / "model.bin").read_bytes()
    for cut in (2, 9, 40, len(blob) // 2, len(blob) - 1):
        (folder / "model.bin").write_bytes(blob[:cut])
        with pytest.raises(ConversionError, match=r"model.bin: truncated at byte \d+ of " + str(cut)):
            read_model_bin(folder / "model.bin")
    (folder / "model.bin").write_bytes(blob + blob)
    with pytest.raises(ConversionError, match="unexpected bytes after the last alias"):
        read_model_bin(folder / "model.bin")
    (folder / "model.bin").write_bytes(struct.pack("<I", 9) + blob[4:])
    with pytest.raises(ConversionError, match="binary version 9 is not supported"):
        read_model_bin(folder / "model.bin")
    (folder / "model.bin").unlink()
    with pytest.raises(ConversionError, match="model.bin not found"):
        convert_ct2_whisper(folder, tmp_path / "out")


def _rewrite(folder: Path, model, change) -> None:
    variables, aliases = ct2_variables(model)
    spec = change(variables, aliases) or "WhisperSpec"
    (folder / "model.bin").write_bytes(model_bin_bytes(variables, aliases, spec=spec))


@pytest.mark.parametrize("change,message", [
    (lambda v, a: "TransformerSpec", "holds a CTranslate2 'TransformerSpec', not a Whisper model"),
    (lambda v, a: v.__delitem__("encoder/layer_1/ffn/linear_1/weight"),
     "encoder/layer_1/ffn/linear_1/weight is missing"),
    (lambda v, a: v.update({"decoder/activation": np.array(np.int8(0))}), "decoder/activation = 0"),
    (lambda v, a: v.update({"decoder/layer_0/self_attention/relative_position_keys": np.zeros((3, 4), np.float32)}),
     "no place in HF's Whisper"),
    (lambda v, a: v.update({"encoder/conv1/weight_zero": np.zeros(16, np.float32)}), "AWQ-quantized"),
    (lambda v, a: v.update({"decoder/projection/bias": np.ones(len(VOCAB), np.float32)}), "projection/bias is nonzero"),
])
def test_variables_hf_whisper_cannot_hold_are_refused(tmp_path, model, change, message):
    folder = write_ct2_folder(tmp_path, model)
    _rewrite(folder, model, change)
    with pytest.raises(ConversionError, match=message):
        convert_ct2_whisper(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mismatched_side_files_and_existing_output_are_refused(tmp_path, model, capsys):
    folder = write_ct2_folder(tmp_path / "ct2", model)
    (folder / "vocabulary.txt").write_text("\n".join(VOCAB[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(ConversionError, match="vocabulary lists 276 tokens but model.bin's embeddings have 277"):
        convert_ct2_whisper(folder, tmp_path / "out")

    folder = write_ct2_folder(tmp_path / "ct2", model)
    other = json.loads((folder / "tokenizer.json").read_text())
    other["model"]["vocab"] = {t: (i + 1) % len(other["model"]["vocab"]) for t, i in other["model"]["vocab"].items()}
    (folder / "tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(ConversionError, match="tokenizer.json belongs to another Whisper model"):
        convert_ct2_whisper(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    folder = write_ct2_folder(tmp_path / "ct2", model)
    (tmp_path / "out").mkdir()
    assert main(["--model-dir", str(folder), "--out", str(tmp_path / "out")]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["--model-dir", str(folder), "--out", str(tmp_path / "out"), "--force"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
