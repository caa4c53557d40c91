"""Convert a CTranslate2 (faster-whisper) Whisper folder into a Hugging Face Whisper folder.

`convert_ct2_whisper` is the conversion; `python -m convert.ctranslate2_whisper` its command.

The input folder is what `ct2-transformers-converter` writes and faster-whisper loads: `model.bin` (see
`convert.ctranslate2_bin` for its layout), `config.json` (suppressed tokens, language ids, alignment heads),
the vocabulary (`vocabulary.json` or `vocabulary.txt`, one token per id) and usually `tokenizer.json`
and `preprocessor_config.json`. The output loads with `WhisperForConditionalGeneration.from_pretrained`
(every key present, none unexpected) and `AutoTokenizer` / `WhisperFeatureExtractor`.

Names map as CTranslate2's own Whisper converter (`ctranslate2/converters/transformers.py`, WhisperLoader)
fused them, undone here:

    encoder/conv{1,2}/{weight,bias}                     model.encoder.conv{1,2}.*
    {en,de}coder/position_encodings/encodings           model.{en,de}coder.embed_positions.weight
    {en,de}coder/layer_norm/{gamma,beta}                model.{en,de}coder.layer_norm.{weight,bias}
    {en,de}coder/layer_N/self_attention/linear_0        self_attn.{q,k,v}_proj (fused [q; k; v] rows)
    {en,de}coder/layer_N/self_attention/linear_1        self_attn.out_proj
    {en,de}coder/layer_N/self_attention/layer_norm      self_attn_layer_norm
    decoder/layer_N/attention/linear_0                  encoder_attn.q_proj
    decoder/layer_N/attention/linear_1                  encoder_attn.{k,v}_proj (fused [k; v] rows)
    decoder/layer_N/attention/linear_2                  encoder_attn.out_proj
    decoder/layer_N/attention/layer_norm                encoder_attn_layer_norm
    {en,de}coder/layer_N/ffn/linear_{0,1}               fc1, fc2
    {en,de}coder/layer_N/ffn/layer_norm                 final_layer_norm
    decoder/embeddings/weight                           model.decoder.embed_tokens.weight
    decoder/projection/weight                           proj_out.weight (tied when equal to the embeddings)

int8 / int16 weights (`ct2 --quantization int8...`) are dequantized with their `weight_scale`.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from convert import ConversionError
from convert.ctranslate2_bin import Ct2Weights, read_model_bin

OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Rank-0 variables of a Whisper model.bin that are not weights. A value here is the one HF's Whisper
# implements (anything else would change the math); None = metadata that HF keeps elsewhere or ignores.
_FLAGS = {
    "encoder/num_heads": None,
    "decoder/num_heads": None,
    "decoder/activation": 3,  # ctranslate2 Activation.GELU
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
    "decoder/alibi_use_positive_positions": None,  # only read when alibi is on
    "decoder/scale_alibi": None,
    "decoder/start_from_zero_embedding": 0,
    "decoder/alignment_layer": None,  # word-timestamp alignment; HF reads generation_config.alignment_heads
    "decoder/alignment_heads": None,
}


@dataclass
class Ct2WhisperFolder:
    """What a CTranslate2 Whisper folder holds, read and checked."""

    path: Path
    weights: Ct2Weights
    config: dict
    """config.json of the CTranslate2 folder (suppress_ids, suppress_ids_begin, lang_ids, alignment_heads)."""
    vocabulary: list[str]
    """Token of every id, timestamps included."""


def read_json(path: Path):
    """The JSON value in `path`, or a ConversionError naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None


def read_vocabulary(folder: Path) -> list[str]:
    """The id → token list of a CTranslate2 folder: vocabulary.json (a JSON list) or vocabulary.txt (a line each)."""
    as_json, as_text = folder / "vocabulary.json", folder / "vocabulary.txt"
    if as_json.is_file():
        tokens = read_json(as_json)
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ConversionError(f"{as_json}: expected a JSON list of token strings")
        return tokens
    if as_text.is_file():
        lines = as_text.read_text(encoding="utf-8").split("\n")
        return lines[:-1] if lines and lines[-1] == "" else lines
    raise ConversionError(f"{folder}: no vocabulary.json or vocabulary.txt; a CTranslate2 Whisper folder has one "
                          "(ct2-transformers-converter writes it beside model.bin)")


def read_ct2_whisper(folder: str | Path) -> Ct2WhisperFolder:
    """Read model.bin, config.json and the vocabulary of a CTranslate2 Whisper folder, checking they belong together."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: CTranslate2 model folder not found")
    weights = read_model_bin(folder / "model.bin")
    if weights.spec != "WhisperSpec":
        raise ConversionError(f"{folder / 'model.bin'}: holds a CTranslate2 '{weights.spec}', not a Whisper model "
                              "(spec name 'WhisperSpec')")
    config_path = folder / "config.json"
    config = {}
    if config_path.is_file():
        config = read_json(config_path)
    vocabulary = read_vocabulary(folder)
    embeddings = weights.variables.get("decoder/embeddings/weight")
    if embeddings is None:
        raise ConversionError(f"{folder / 'model.bin'}: no decoder/embeddings/weight; not a complete Whisper model")
    if len(vocabulary) != embeddings.shape[0]:
        raise ConversionError(f"{folder}: the vocabulary lists {len(vocabulary)} tokens but model.bin's embeddings "
                              f"have {embeddings.shape[0]} rows; the vocabulary file belongs to another model")
    return Ct2WhisperFolder(folder, weights, config, vocabulary)


def _dequantized(weights: Ct2Weights) -> dict[str, torch.Tensor]:
    """Float tensors for every weight: int8 rows / their per-row scale, int16 / its scalar scale.

    Aliases are resolved after dequantizing: ctranslate2 aliases before it quantizes, so only the alias target
    has a `weight_scale` (e.g. decoder/embeddings/weight, which decoder/projection/weight repeats).
    """
    variables, source = weights.variables, weights.path
    out = {}
    for name, value in variables.items():
        base = name.rsplit("_", 1)[0]
        if name in weights.aliases or (name.endswith(("_scale", "_zero")) and base in variables):
            continue
        if f"{name}_zero" in variables:
            raise ConversionError(f"{source}: {name} is AWQ-quantized (has {name}_zero); only float and "
                                  "int8/int16 CTranslate2 models can be converted")
        scale = variables.get(f"{name}_scale")
        if scale is not None:
            scale = scale.float()
            if value.dtype == torch.int8:  # per output row (conv weights: per output channel)
                value = value.float() / scale.reshape(-1, *[1] * (value.dim() - 1))
            elif value.dtype == torch.int16:
                value = value.float() / scale
            else:
                raise ConversionError(f"{source}: {name} has a scale but dtype {value.dtype}")
        out[name] = value
    for alias, target in weights.aliases.items():
        if target in out:
            out[alias] = out[target]
    return out


class _Taker:
    """Hands out CTranslate2 variables by name and remembers which were used, so leftovers can be reported."""

    def __init__(self, variables: dict[str, torch.Tensor], source: Path):
        self.variables, self.source, self.used = variables, source, set()

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.variables:
            raise ConversionError(f"{self.source}: variable {name} is missing; the file is not a complete "
                                  "CTranslate2 Whisper model")
        self.used.add(name)
        return self.variables[name]

    def optional(self, name: str) -> torch.Tensor | None:
        return self(name) if name in self.variables else None

    def count(self, prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"layer_(\d+)/")
        found = {int(m.group(1)) for name in self.variables if (m := pattern.match(name))}
        if found != set(range(len(found))):
            raise ConversionError(f"{self.source}: {prefix}layer_N numbering has gaps: {sorted(found)}")
        return len(found)


def _split_rows(value: torch.Tensor, parts: int, name: str, source: Path) -> list[torch.Tensor]:
    if value.shape[0] % parts:
        raise ConversionError(f"{source}: {name} has {value.shape[0]} rows, not divisible into {parts} fused parts")
    return list(value.chunk(parts, dim=0))


def _linear(take: _Taker, ct2: str, hf: str, state: dict) -> None:
    state[f"{hf}.weight"] = take(f"{ct2}/weight")
    bias = take.optional(f"{ct2}/bias")
    if bias is not None:
        state[f"{hf}.bias"] = bias


def _norm(take: _Taker, ct2: str, hf: str, state: dict) -> None:
    state[f"{hf}.weight"] = take(f"{ct2}/gamma")
    state[f"{hf}.bias"] = take(f"{ct2}/beta")


def _fused(take: _Taker, ct2: str, hf_prefix: str, names: list[str], state: dict) -> None:
    """Split a fused projection ([q; k; v] or [k; v] rows) into HF's separate q/k/v_proj.

    HF's Whisper has no k_proj bias; CTranslate2 fills that slice with zeros. A nonzero key bias would not
    change the attention anyway (q·b is the same for every key, and softmax ignores a constant), so it is
    dropped either way.
    """
    weights = _split_rows(take(f"{ct2}/weight"), len(names), f"{ct2}/weight", take.source)
    bias = take.optional(f"{ct2}/bias")
    biases = _split_rows(bias, len(names), f"{ct2}/bias", take.source) if bias is not None else [None] * len(names)
    for name, weight, b in zip(names, weights, biases, strict=True):
        state[f"{hf_prefix}.{name}.weight"] = weight
        if b is not None and name != "k_proj":
            state[f"{hf_prefix}.{name}.bias"] = b


def _layer(take: _Taker, ct2: str, hf: str, state: dict, cross: bool) -> None:
    _fused(take, f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ["q_proj", "k_proj", "v_proj"], state)
    _linear(take, f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj", state)
    _norm(take, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", state)
    if cross:
        _linear(take, f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj", state)
        _fused(take, f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ["k_proj", "v_proj"], state)
        _linear(take, f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj", state)
        _norm(take, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm", state)
    _linear(take, f"{ct2}/ffn/linear_0", f"{hf}.fc1", state)
    _linear(take, f"{ct2}/ffn/linear_1", f"{hf}.fc2", state)
    _norm(take, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm", state)


def hf_state_dict(weights: Ct2Weights) -> tuple[dict[str, torch.Tensor], dict]:
    """HF `WhisperForConditionalGeneration` tensors from CTranslate2 Whisper variables, and the architecture.

    Returns `(state, arch)`; `arch` holds the WhisperConfig sizes read off the tensors and head counts, and
    `tied` (whether proj_out repeats the token embeddings). Raises ConversionError for missing variables,
    leftovers it cannot place, and flags whose value HF's Whisper does not implement.
    """
    source = weights.path
    variables = _dequantized(weights)
    take = _Taker(variables, source)
    state: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        _linear(take, f"encoder/{conv}", f"model.encoder.{conv}", state)
    for side in ("encoder", "decoder"):
        state[f"model.{side}.embed_positions.weight"] = take(f"{side}/position_encodings/encodings")
        _norm(take, f"{side}/layer_norm", f"model.{side}.layer_norm", state)
    n_enc, n_dec = take.count("encoder/"), take.count("decoder/")
    for i in range(n_enc):
        _layer(take, f"encoder/layer_{i}", f"model.encoder.layers.{i}", state, cross=False)
    for i in range(n_dec):
        _layer(take, f"decoder/layer_{i}", f"model.decoder.layers.{i}", state, cross=True)
    embeddings = take("decoder/embeddings/weight")
    projection = take("decoder/projection/weight")
    state["model.decoder.embed_tokens.weight"] = embeddings
    tied = weights.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight" or torch.equal(
        projection, embeddings)
    if not tied:
        state["proj_out.weight"] = projection
    projection_bias = take.optional("decoder/projection/bias")
    if projection_bias is not None and projection_bias.any():
        raise ConversionError(f"{source}: decoder/projection/bias is nonzero; HF's Whisper output layer has no bias")

    for name, required in _FLAGS.items():
        if name in variables:
            take.used.add(name)
            if required is not None and int(variables[name]) != required:
                raise ConversionError(f"{source}: {name} = {int(variables[name])}, but HF's Whisper implements "
                                      f"only {required}; this model.bin is not a standard Whisper")
    leftover = sorted(set(variables) - take.used)
    if leftover:
        raise ConversionError(f"{source}: {len(leftover)} variables that have no place in HF's Whisper "
                              f"(e.g. {leftover[:5]}); the converter does not know this Whisper variant")

    fc1_enc = state["model.encoder.layers.0.fc1.weight"] if n_enc else None
    fc1_dec = state["model.decoder.layers.0.fc1.weight"] if n_dec else None
    conv1 = state["model.encoder.conv1.weight"]
    arch = dict(
        vocab_size=embeddings.shape[0], d_model=conv1.shape[0], num_mel_bins=conv1.shape[1],
        encoder_layers=n_enc, decoder_layers=n_dec,
        encoder_attention_heads=int(take("encoder/num_heads")), decoder_attention_heads=int(take("decoder/num_heads")),
        encoder_ffn_dim=fc1_enc.shape[0] if fc1_enc is not None else 4 * conv1.shape[0],
        decoder_ffn_dim=fc1_dec.shape[0] if fc1_dec is not None else 4 * conv1.shape[0],
        max_source_positions=state["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=state["model.decoder.embed_positions.weight"].shape[0],
        tied=tied,
    )
    return state, arch


def _token_id(vocabulary: list[str], token: str, source: Path) -> int:
    try:
        return vocabulary.index(token)
    except ValueError:
        raise ConversionError(f"{source}: the vocabulary has no {token}; not a Whisper vocabulary") from None


def whisper_token_ids(vocabulary: list[str], source: Path) -> dict[str, int]:
    """Ids of Whisper's special tokens, looked up in the vocabulary (they differ between English-only and
    multilingual models)."""
    names = {"eot": "<|endoftext|>", "sot": "<|startoftranscript|>", "translate": "<|translate|>",
             "transcribe": "<|transcribe|>", "prev": "<|startofprev|>", "no_timestamps": "<|notimestamps|>"}
    return {key: _token_id(vocabulary, token, source) for key, token in names.items()}


def build_configs(arch: dict, ct2: Ct2WhisperFolder, dtype: str):
    """The HF WhisperConfig and GenerationConfig for a converted model."""
    from transformers import GenerationConfig, WhisperConfig

    ids = whisper_token_ids(ct2.vocabulary, ct2.path)
    sizes = {k: v for k, v in arch.items() if k != "tied"}
    suppress = ct2.config.get("suppress_ids", [])
    begin_suppress = ct2.config.get("suppress_ids_begin", [ids["eot"]])
    config = WhisperConfig(
        **sizes, bos_token_id=ids["eot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"], suppress_tokens=suppress, begin_suppress_tokens=begin_suppress,
        tie_word_embeddings=arch["tied"], dtype=dtype, architectures=["WhisperForConditionalGeneration"],
    )
    # OpenAI's rule: multilingual checkpoints are exactly those with the larger vocabulary (51865+ tokens).
    multilingual = arch["vocab_size"] >= 51865
    generation = GenerationConfig(
        bos_token_id=ids["eot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"], suppress_tokens=suppress, begin_suppress_tokens=begin_suppress,
        max_length=arch["max_target_positions"], no_timestamps_token_id=ids["no_timestamps"],
        prev_sot_token_id=ids["prev"], is_multilingual=multilingual, max_initial_timestamp_index=50,
        return_timestamps=False,
    )
    if ct2.config.get("alignment_heads"):
        generation.alignment_heads = [list(pair) for pair in ct2.config["alignment_heads"]]
    if multilingual:
        generation.lang_to_id = {ct2.vocabulary[i]: i for i in ct2.config.get("lang_ids", [])}
        generation.task_to_id = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    return config, generation


def write_tokenizer(ct2: Ct2WhisperFolder, out: Path) -> None:
    """tokenizer.json (copied, or rebuilt from the vocabulary) + tokenizer_config.json for HF's WhisperTokenizer.

    Ids the tokenizer.json lacks but the vocabulary has (the timestamp tokens `<|0.00|>` ... `<|30.00|>`) are
    added as plain added tokens, as the Hub's Whisper tokenizers hold them, so every model id decodes.
    """
    from convert.bpe_from_vocab import whisper_tokenizer_json

    source = ct2.path / "tokenizer.json"
    if source.is_file():
        data = read_json(source)
    else:
        data = whisper_tokenizer_json(ct2.vocabulary, ct2.path)
    known = {tok: i for tok, i in data.get("model", {}).get("vocab", {}).items()}
    known.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    for token, i in known.items():
        if i >= len(ct2.vocabulary) or ct2.vocabulary[i] != token:
            theirs = ct2.vocabulary[i] if i < len(ct2.vocabulary) else "nothing"
            raise ConversionError(f"{source}: token {token!r} has id {i} there but the model's vocabulary has "
                                  f"{theirs!r} at that id; tokenizer.json belongs to another Whisper model")
    taken = set(known.values())
    for i, token in enumerate(ct2.vocabulary):
        if i not in taken:
            data.setdefault("added_tokens", []).append(
                {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": False})
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    specials = [t["content"] for t in sorted(data["added_tokens"], key=lambda t: t["id"]) if t.get("special")]
    eot = "<|endoftext|>"
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
        "pad_token": eot, "add_prefix_space": False, "errors": "replace", "model_max_length": 1024,
        "extra_special_tokens": [t for t in specials if t != eot],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2) + "\n")


def write_preprocessor(ct2: Ct2WhisperFolder, num_mel_bins: int, out: Path) -> None:
    """preprocessor_config.json: the folder's own when it has one (large-v3: 128 mel bins), else Whisper's defaults."""
    from transformers import WhisperFeatureExtractor

    source = ct2.path / "preprocessor_config.json"
    if source.is_file():
        data = read_json(source)
        if data.get("feature_size", num_mel_bins) != num_mel_bins:
            raise ConversionError(f"{source}: feature_size {data['feature_size']} but the model reads "
                                  f"{num_mel_bins} mel bins; the file belongs to another model")
        shutil.copyfile(source, out / "preprocessor_config.json")
        return
    WhisperFeatureExtractor(feature_size=num_mel_bins).to_json_file(out / "preprocessor_config.json")


def convert_ct2_whisper(model_dir: str | Path, out_dir: str | Path, dtype: str = "float32",
                        force: bool = False) -> Path:
    """Write the HF folder for a CTranslate2 Whisper folder; returns `out_dir`.

    The folder is assembled under `<out_dir>.tmp` and renamed when complete, so an interrupted run leaves
    no half folder behind. An existing `out_dir` is replaced only with `force`.
    """
    from transformers import WhisperForConditionalGeneration

    if dtype not in OUT_DTYPES:
        raise ConversionError(f"--dtype {dtype}: choose one of {sorted(OUT_DTYPES)}")
    out = Path(out_dir)
    if out.exists() and not force:
        raise ConversionError(f"{out}: already exists; pass --force to replace it")
    ct2 = read_ct2_whisper(model_dir)
    state, arch = hf_state_dict(ct2.weights)
    config, generation = build_configs(arch, ct2, dtype)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    expected = model.state_dict()
    if arch["tied"]:
        expected.pop("proj_out.weight")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
              for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ConversionError(f"{ct2.path}: converted tensors do not fit WhisperForConditionalGeneration: missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}, shapes {shapes[:3]}")
    state = {k: v.to(OUT_DTYPES[dtype]).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if arch["tied"]:
        model.tie_weights()
    model.generation_config = generation

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    write_tokenizer(ct2, tmp)
    write_preprocessor(ct2, arch["num_mel_bins"], tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
