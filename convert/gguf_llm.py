"""Convert a GGUF causal LM (llama.cpp's format) into a plain Hugging Face folder with safetensors.

The command over `convert.llm_gguf` (the conversion, and what it writes).

    python -m convert.gguf_llm --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2-135m-hf
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: quiet their known third-party noise
    from common.cli import quiet_third_party_logs

    quiet_third_party_logs()

import argparse
import sys

from common.cli import run
from convert import ConversionError
from convert.llm_gguf import OUT_DTYPES, convert_gguf_llm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.gguf_llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", required=True, help="GGUF file of a causal LM (LLaMA family, ...)")
    parser.add_argument("--out", required=True, help="Hugging Face folder to write")
    parser.add_argument("--dtype", default="float32", choices=sorted(OUT_DTYPES),
                        help="dtype of the saved weights (float32 holds dequantized values exactly)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        summary = convert_gguf_llm(args.gguf, args.out, args.dtype, args.force)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    types = ", ".join(f"{n} {t}" for t, n in summary["tensor_types"].items())
    print(f"wrote {args.out} ({summary['architecture']} '{summary['name']}', dequantized from {types})")
    return 0


if __name__ == "__main__":
    run(main)
