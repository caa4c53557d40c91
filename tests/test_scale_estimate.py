"""The real-scale estimator: exact parameter counts of the real architectures (pinned by formulas written out here
and the published totals), weight bytes, int8 bytes, KV cache and activation coefficients against tiny models
measured in-process, and the CLI's table for the SALMONN-13B preset."""

from pathlib import Path

import pytest
import torch
import yaml
from tiny_salmonn import TEXTS, tiny_config, write_official_layout
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    WhisperConfig,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from common.bpe import train_bpe
from common.sizes import weight_bytes
from scale import estimate
from scale.architectures import ArchitectureError, build_meta, llm_config, whisper_config
from scale.estimate import (
    ACTIVATIONS,
    count_params,
    decode_read_bytes,
    fp16_bytes,
    int8_bytes,
    kv_cache_bytes,
    layer_activations,
    llm_shape,
    main,
)
from teacher.beats import BEATs, BEATsConfig
from teacher.build import LLMConfig, LoraSpec, build_salmonn
from teacher.qformer import QFormerConfig

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


# ----- the formulas (independent of the estimator: written from each architecture's definition) ----------------

def llama_params(h, f, layers, vocab, kv_dim=None):
    kv_dim = kv_dim or h
    return 2 * vocab * h + layers * (2 * h * h + 2 * h * kv_dim + 3 * h * f + 2 * h) + h


def gemma2_params(h, f, layers, vocab, heads, kv_heads, head_dim):
    q, kv = heads * head_dim, kv_heads * head_dim
    return vocab * h + layers * (h * (2 * q + 2 * kv) + 3 * h * f + 4 * h) + h  # tied embeddings, 4 norms a layer


def whisper_encoder_params(d, layers, f, mels, positions):
    per_layer = 4 * d * d + 3 * d + 2 * d * f + f + d + 2 * 2 * d  # q, v, out biases (k has none), 2 layer norms
    return (mels * d * 3 + d) + (d * d * 3 + d) + positions * d + layers * per_layer + 2 * d


def beats_params(embed, d, layers, f, heads, conv_pos, groups, buckets, classes):
    per_layer = 4 * (d * d + d) + (d // heads * 8 + 8) + heads + 2 * d + (d * f + f) + (f * d + d) + 2 * d
    conv = d * (d // groups) * conv_pos + conv_pos + d  # weight-normed positional conv: v, g, bias
    return (16 * 16 * embed) + 2 * embed + (embed * d + d) + conv + 2 * d + layers * per_layer + buckets * heads \
        + (d * classes + classes)


def qformer_params(h, f, layers, encoder_dim, queries):
    per_layer = 4 * (h * h + h) + 2 * h + 2 * (h * h + h) + 2 * (encoder_dim * h + h) + 2 * h + (h * f + f) \
        + (f * h + h) + 2 * h
    return 2 * h + layers * per_layer + queries * h


# The published totals (Hugging Face model cards / config.json): LLaMA-13B, Llama-2-7B, Gemma-2-2B.
PUBLISHED = {"vicuna-13b-v1.1": 13_015_864_320, "vicuna-7b-v1.5": 6_738_415_616, "gemma-2-2b": 2_614_341_888}


def meta_llm(name: str, add_pad_token: bool = False) -> nn.Module:
    config = llm_config(LLMConfig(path=f"checkpoints/{name}", add_pad_token=add_pad_token))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_published_llm_counts_equal_the_formulas_and_the_meta_models():
    assert PUBLISHED["vicuna-13b-v1.1"] == llama_params(5120, 13824, 40, 32000)
    assert PUBLISHED["vicuna-7b-v1.5"] == llama_params(4096, 11008, 32, 32000)
    assert PUBLISHED["gemma-2-2b"] == gemma2_params(2304, 9216, 26, 256000, 8, 4, 256)
    for name, total in PUBLISHED.items():
        model = meta_llm(name)
        assert next(model.parameters()).device.type == "meta"
        assert count_params(model) == sum(p.numel() for p in model.parameters()) == total, name
    # SALMONN adds [PAD] to Vicuna's tokenizer: one more row in the embedding and in the LM head.
    assert count_params(meta_llm("vicuna-13b-v1.1", add_pad_token=True)) == PUBLISHED["vicuna-13b-v1.1"] + 2 * 5120
    assert count_params(meta_llm("gemma-2-2b", add_pad_token=True)) == PUBLISHED["gemma-2-2b"]  # has <pad>


def salmonn_13b_meta(**kwargs):
    teacher = yaml.safe_load((REPO / "configs/salmonn13b-gemma2b/teacher.yaml").read_text())["model"]
    from common.config import from_dict
    from scale.architectures import beats_config
    from teacher.build import SalmonnConfig

    cfg = from_dict(SalmonnConfig, teacher)
    llm = llm_config(cfg.llm)
    return build_meta(whisper_config(cfg.whisper), beats_config(cfg.beats), cfg.qformer, llm, "float16", cfg.lora,
                      **kwargs)


def test_salmonn_13b_parts_equal_their_formulas():
    model = salmonn_13b_meta()
    assert count_params(model.speech_encoder) == whisper_encoder_params(1280, 32, 5120, 80, 1500) == 636_784_640
    assert count_params(model.audio_encoder) == beats_params(512, 768, 12, 3072, 12, 128, 16, 320, 527) == 90_717_055
    assert count_params(model.qformer) == qformer_params(768, 3072, 2, 1280 + 768, 1)
    lora = 40 * 2 * 8 * (5120 + 5120)  # r × (in + out) for q_proj and v_proj of every layer
    assert count_params(model.llm) == PUBLISHED["vicuna-13b-v1.1"] + 2 * 5120 + lora
    glue = 2 * 1280 + 2 * 768 + (768 * 5120 + 5120)  # ln_speech, ln_audio, projector
    assert count_params(model) == sum(count_params(m) for m in (model.speech_encoder, model.audio_encoder,
                                                                  model.qformer, model.llm)) + glue
    student = salmonn_13b_meta(whisper_layers=8)
    assert count_params(student.speech_encoder) == whisper_encoder_params(1280, 8, 5120, 80, 1500)


def test_pruning_keeps_prune_structured_widths():
    gemma = llm_config(LLMConfig(path="checkpoints/gemma-2-2b"))
    whisper = WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=100,
                            num_mel_bins=80, max_source_positions=50)
    model = build_meta(whisper, None, QFormerConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64),
                       gemma, "float16", LoraSpec(enabled=False), prune_ratio=0.25)
    c = model.llm.config
    # MLP channels × 0.75 (a multiple of 8), one of the four KV groups with its two query heads, width kept.
    assert (c.hidden_size, c.intermediate_size, c.num_key_value_heads, c.num_attention_heads) == (2304, 6912, 3, 6)
    assert count_params(model.llm) == gemma2_params(2304, 6912, 26, 256000, 6, 3, 256)
    layer = model.speech_encoder.layers[0]
    assert model.speech_encoder.config.encoder_ffn_dim == 72  # 100 − 25 = 75 → nearest multiple of 8
    assert (layer.self_attn.q_proj.out_features, layer.self_attn.out_proj.in_features) == (48, 48)  # 3 heads × 16


# ----- against tiny models measured here -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    write_official_layout(root)
    return root


def tiny_meta(root: Path):
    from scale.architectures import beats_config

    cfg = tiny_config(root)
    return cfg, build_meta(whisper_config(cfg.whisper), beats_config(cfg.beats), cfg.qformer, llm_config(cfg.llm),
                           cfg.llm.dtype, cfg.lora)


def quantize_int8(module: nn.Module) -> None:
    """torchao int8 weight-only on every nn.Linear but the LM head (prune.quantize's default)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(module, Int8WeightOnlyConfig(),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.split(".")[-1] != "lm_head")


def test_tiny_salmonn_params_and_weight_bytes_match_the_built_model(tiny):
    cfg, meta = tiny_meta(tiny)
    model, _ = build_salmonn(cfg)
    model = model.half()
    parts = model.parts()
    assert count_params(meta) == sum(p.numel() for p in model.parameters())
    assert {k: count_params(v) for k, v in meta.parts().items()} == \
        {k: sum(p.numel() for p in v.parameters()) for k, v in parts.items()}
    assert estimate.weight_bytes(meta, "fp16") == fp16_bytes(meta) == weight_bytes(model, parts)["total"]
    for part in estimate.INT8_PARTS:
        quantize_int8(parts[part])
    assert estimate.weight_bytes(meta, "int8") == weight_bytes(model, model.parts())["total"]


def write_gemma(folder: Path, tied: bool = True) -> Path:
    torch.manual_seed(0)
    tok = train_bpe(TEXTS, 150, "bytelevel")
    config = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=tied,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Gemma2ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tied", [True, False])
def test_int8_bytes_kv_cache_and_decode_reads_of_a_gemma(tmp_path, tied):
    folder = write_gemma(tmp_path / "gemma", tied)
    config = llm_config(LLMConfig(path=str(folder)))
    whisper = WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                            num_mel_bins=80, max_source_positions=50)
    meta = build_meta(whisper, None, QFormerConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64),
                      config, "float16", LoraSpec(enabled=False))
    llm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).eval()
    assert fp16_bytes(meta.llm) == weight_bytes(llm, {})["total"]
    h, vocab = 64, config.vocab_size
    # One decode step reads every weight; of the input embedding one row, unless it is the (tied) LM head.
    assert decode_read_bytes(meta, "fp16") == fp16_bytes(meta.llm) - (0 if tied else 2 * (vocab - 1) * h)
    with torch.no_grad():
        out = llm(input_ids=torch.randint(0, vocab, (3, 11)), use_cache=True)
    cached = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers
                 for t in (layer.keys, layer.values))
    assert kv_cache_bytes(llm_shape(meta), 11, 3) == cached
    quantize_int8(llm)
    assert int8_bytes(meta.llm) == weight_bytes(llm, {})["total"]
    assert int8_bytes(meta.llm) < fp16_bytes(meta.llm)
    assert decode_read_bytes(meta, "int8") == int8_bytes(meta.llm) - (0 if tied else 2 * (vocab - 1) * h)


def saved_activation_bytes(model: nn.Module, run) -> int:
    """Bytes of the distinct tensors autograd saves for backward during `run()`, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    store: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            store[ptr] = max(store.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(model)
    return sum(store.values())


def per_layer_bytes(make, run) -> int:
    """What one more layer saves: a two-layer model less a one-layer one (stem and final norm cancel)."""
    measured = []
    for layers in (1, 2):
        torch.manual_seed(0)
        measured.append(saved_activation_bytes(make(layers).half(), run))
    return measured[1] - measured[0]


@pytest.mark.parametrize("tokens", [32, 64])
def test_activation_coefficients_match_traced_layers(tokens):
    b, h, f, heads, kv = 2, 128, 256, 4, 2
    x = torch.randn(b, tokens, h, dtype=torch.half, requires_grad=True)
    llama = per_layer_bytes(lambda n: LlamaForCausalLM(LlamaConfig(
        vocab_size=50, hidden_size=h, intermediate_size=f, num_hidden_layers=n, num_attention_heads=heads,
        num_key_value_heads=kv, attn_implementation="eager")), lambda m: m.model(inputs_embeds=x))
    gemma = per_layer_bytes(lambda n: Gemma2ForCausalLM(Gemma2Config(
        vocab_size=50, hidden_size=h, intermediate_size=f, num_hidden_layers=n, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=48, attn_implementation="eager")), lambda m: m.model(inputs_embeds=x))
    mel = torch.randn(b, 80, 2 * tokens, dtype=torch.half, requires_grad=True)
    whisper = per_layer_bytes(lambda n: WhisperEncoder(WhisperConfig(
        d_model=h, encoder_layers=n, encoder_attention_heads=heads, encoder_ffn_dim=f, num_mel_bins=80,
        max_source_positions=tokens, attn_implementation="eager")), lambda m: m(mel))
    fbank = torch.randn(b, tokens // 8 * 16, 128, dtype=torch.half, requires_grad=True)  # 8 patches per 16 frames
    beats = per_layer_bytes(lambda n: BEATs(BEATsConfig(
        input_patch_size=16, embed_dim=32, encoder_layers=n, encoder_embed_dim=h, encoder_ffn_embed_dim=f,
        encoder_attention_heads=heads, conv_pos=16, conv_pos_groups=4, relative_position_embedding=True,
        gru_rel_pos=True, deep_norm=True, dropout=0.0, attention_dropout=0.0)), lambda m: m.forward_fbank(fbank))
    expected = {"llama": (llama, h), "gemma2": (gemma, heads * 48), "whisper": (whisper, h), "beats": (beats, h)}
    for kind, (measured, q_dim) in expected.items():
        predicted = layer_activations(ACTIVATIONS[kind], tokens, b, h, heads, q_dim, f)
        assert predicted == pytest.approx(measured, rel=0.01), kind


# ----- the command line ------------------------------------------------------------------------------------------

def test_cli_prints_the_13b_table_with_an_independent_tpot_floor(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["--config", "configs/salmonn13b-gemma2b/estimate.yaml", "--gpu", "v100-32gb"]) == 0
    out = capsys.readouterr().out
    rows = {line[:26].strip(): line[26:].split() for line in out.splitlines() if line.startswith(("teacher ",
                                                                                                  "student "))}
    assert list(rows) == ["teacher", "student distilled", "student pruned 25%", "student pruned 50%",
                          "student pruned 25% int8", "student pruned 50% int8"]
    vicuna = PUBLISHED["vicuna-13b-v1.1"] + 2 * 5120 + 40 * 2 * 8 * 2 * 5120  # + [PAD] rows + LoRA
    read = 2 * (vicuna - 32001 * 5120) + 2 * 5120  # the input embedding: one row per token
    kv = 2 * 40 * 40 * 128 * 256 * 2
    assert float(rows["teacher"][4]) == pytest.approx((read + kv) / 900e9 * 1e3, abs=0.006)
    assert rows["teacher"][-1] == "yes"  # 27.6 GB of fp16 weights fit a 32 GB V100
    tpot = {name: float(row[4]) for name, row in rows.items()}
    assert tpot["student pruned 50% int8"] < tpot["student pruned 50%"] < tpot["student distilled"]
    assert tpot["teacher"] / tpot["student pruned 50% int8"] > 4  # DESIGN's TPOT target, at the bandwidth floor
    assert "as configured (LoRA)" in out and "full fine-tuning" in out

    # int8-frozen LoRA: the teacher's frozen Vicuna (fp16: 2 → 1 byte per linear weight) and Whisper (fp32 + fp16
    # autocast copy: 6 → 1), each with an fp32 scale per output row, written out from the architectures.
    int8_rows = {line[:52].strip(): line[82:].split() for line in out.splitlines()
                 if line.startswith(("SALMONN teacher: LoRA", "distillation of the student"))}
    teacher_today, teacher_int8, *fits = int8_rows["SALMONN teacher: LoRA fine-tuning, micro-batch 4"]
    llm_linear = PUBLISHED["vicuna-13b-v1.1"] + 5120 - 32001 * 5120 - (40 * 2 * 5120 + 5120)  # + [PAD] head row
    llm_rows = 40 * (5 * 5120 + 2 * 13824) + 32001
    whisper_linear, whisper_rows = 32 * (4 * 1280 * 1280 + 2 * 1280 * 5120), 32 * (4 * 1280 + 5120 + 1280)
    saved = llm_linear - 4 * llm_rows + 5 * whisper_linear - 4 * whisper_rows
    assert float(teacher_today) - float(teacher_int8) == pytest.approx(saved / 1e9, abs=0.011)  # two roundings
    assert fits == ["NO", "/", "yes"]  # 13B's frozen fp16 Vicuna does not fit a 32 GB V100; in int8 it does
    student_today, student_int8, *_ = int8_rows["distillation of the student, micro-batch 4"]
    assert float(student_int8) < float(student_today)

    assert main(["--config", "configs/salmonn13b-gemma2b/estimate.yaml", "--gpu", "v100-16gb"]) == 0
    out = capsys.readouterr().out
    assert next(line for line in out.splitlines() if line.startswith("teacher ")).endswith("NO")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_int8_frozen_saving_equals_the_bytes_torchao_stores(tmp_path, dtype):
    from dataclasses import replace

    from common.int8_frozen import weight_bytes as int8_weight_bytes

    cfg = write_official_layout(tmp_path / "official")
    cfg = replace(cfg, llm=replace(cfg.llm, dtype=dtype))
    plain, _ = build_salmonn(cfg)
    int8, _ = build_salmonn(replace(cfg, llm=replace(cfg.llm, int8_frozen=True),
                                    whisper=replace(cfg.whisper, int8_frozen=True)))
    element = 2 if dtype == "float16" else 4
    for part, per_weight in (("llm", element), ("speech_encoder", 4)):
        sizes = int8_weight_bytes(getattr(int8, part))
        stored = sizes["int8_as_fp32"] // 4 * per_weight
        assert estimate.int8_frozen_saving(plain, (part,), {part: per_weight}) == stored - sizes["int8"], part


def test_bad_input_names_the_key_and_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["--config", "configs/salmonn13b-gemma2b/estimate.yaml", "--gpu", "p100"]) == 2
    assert "--gpu p100: unknown; one of v100-32gb" in capsys.readouterr().err
    with pytest.raises(ArchitectureError, match=r"student.llm.path: checkpoints/gemma-9b is not on disk and "
                                                r"'gemma-9b' is not a known architecture \(known: gemma-2-2b"):
        llm_config(LLMConfig(path="checkpoints/gemma-9b"), "student.llm.path")
    config = tmp_path / "estimate.yaml"
    config.write_text("job: scale.estimate\nteacher_config: configs/salmonn13b-gemma2b/cache.yaml\n")
    assert main(["--config", str(config)]) == 2
    assert "cache.yaml has no `model:` SALMONN config" in capsys.readouterr().err
