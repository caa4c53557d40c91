"""Converters from the formats real weights arrive in (CTranslate2, GGUF) to Hugging Face folders.

The rest of smolt loads Hugging Face folders only; these tools turn a faster-whisper (CTranslate2) Whisper
and a GGUF LLaMA-family LLM into such folders, and `convert.provision` fetches the mini preset's weights.
"""


class ConversionError(ValueError):
    """An input file is missing, truncated or not what the converter expects; the message names file and fix."""
