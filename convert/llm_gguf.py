"""Convert a GGUF causal LM (llama.cpp's format) into a plain Hugging Face folder with safetensors.

`convert_gguf_llm` is the conversion; `python -m convert.gguf_llm` its command.

transformers reads GGUF itself (with the `gguf` package): it maps llama.cpp's tensor names back, undoes
llama.cpp's rotary permutation of the q/k projections, dequantizes (Q4_1, Q8_0, ... → float32) and builds
the tokenizer from the file's `tokenizer.ggml.*` metadata and chat template. This tool saves the result as
an ordinary folder: config without the GGUF quantization entry, `model.safetensors`, tokenizer files and
generation config, so `AutoModelForCausalLM.from_pretrained(folder)` needs no `gguf_file` and no `gguf`.

The weights are the dequantized ones: a Q4_1 file gives the Q4_1 model in float32, not the original
bf16 model (the rounding is permanent).
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import torch

from convert import ConversionError

OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_gguf(path: str | Path):
    """Open a GGUF file with `gguf.GGUFReader`, turning its low-level errors into ones that name the file."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: GGUF file not found")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ConversionError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError) as err:
        raise ConversionError(f"{path}: cannot be read as GGUF ({err}); the file is truncated or corrupted — "
                              "download it again") from None
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:
            raise ConversionError(f"{path}: tensor {tensor.name} is cut short; the file is truncated")
    return reader


def gguf_summary(reader) -> dict:
    """Architecture, model name and how many tensors of each GGUF type (F32, Q4_1, ...) the file holds."""
    def field(key: str):
        value = reader.fields.get(key)
        return value.contents() if value is not None else None

    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "license": field("general.license"),
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
    }


def convert_gguf_llm(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32", force: bool = False) -> dict:
    """Write the HF folder for a GGUF causal LM; returns `gguf_summary` of the source.

    Assembled under `<out_dir>.tmp` and renamed when complete. An existing `out_dir` is replaced only with `force`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in OUT_DTYPES:
        raise ConversionError(f"--dtype {dtype}: choose one of {sorted(OUT_DTYPES)}")
    gguf_file, out = Path(gguf_file), Path(out_dir)
    if out.exists() and not force:
        raise ConversionError(f"{out}: already exists; pass --force to replace it")
    summary = gguf_summary(read_gguf(gguf_file))
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise ConversionError(f"{gguf_file}: transformers cannot load this GGUF ({err})") from None

    # A fresh model of the same class from a clean config: no quantization_config pointing at the GGUF file,
    # no `_name_or_path` from the file's metadata.
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype",
                "torch_dtype"):
        config_dict.pop(key, None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.architectures = [type(loaded).__name__]
    config.dtype = dtype
    with torch.device("meta"):
        model = type(loaded)(config)
    state = {k: v.to(OUT_DTYPES[dtype]).contiguous() for k, v in loaded.state_dict().items()}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConversionError(f"{gguf_file}: dequantized tensors do not fit {type(model).__name__}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions:  # GGUF tokenizers come without a length limit; the model's context is the natural one
        tokenizer.model_max_length = max_positions
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return summary
