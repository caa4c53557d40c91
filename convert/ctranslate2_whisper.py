"""Convert a CTranslate2 (faster-whisper) Whisper folder into a Hugging Face Whisper folder.

The command over `convert.whisper_ct2` (the conversion, and what it writes).

    python -m convert.ctranslate2_whisper --model-dir faster-whisper-base --out whisper-base-hf
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: quiet their known third-party noise
    from common.cli import quiet_third_party_logs

    quiet_third_party_logs()

import argparse
import sys

from common.cli import run
from convert import ConversionError
from convert.whisper_ct2 import OUT_DTYPES, convert_ct2_whisper


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.ctranslate2_whisper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="CTranslate2 Whisper folder (model.bin, config.json, "
                        "vocabulary, tokenizer.json)")
    parser.add_argument("--out", required=True, help="Hugging Face folder to write")
    parser.add_argument("--dtype", default="float32", choices=sorted(OUT_DTYPES),
                        help="dtype of the saved weights (float16 sources convert exactly to float32)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        out = convert_ct2_whisper(args.model_dir, args.out, args.dtype, args.force)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run(main)
