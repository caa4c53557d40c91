"""toybench: the toy ASR + audio-captioning benchmark that smolt generates on the machine.

    from toybench.generate import generate, preset
    summary = generate(preset("smoke", seed=0), Path("data/toybench_smoke"))

or `python -m toybench.generate --out DIR --size smoke|default --seed N`. toybench/pipeline.py lists
the output layout; the generated DATACARD.md says what is in it. (`generate` is not re-exported here:
importing the `toybench.generate` module would rebind the package attribute of that name to it.)
"""

from toybench.config import PRESETS, ToyBenchConfig, preset
from toybench.pipeline import GENERATOR_VERSION, verify_manifest

__all__ = ["GENERATOR_VERSION", "PRESETS", "ToyBenchConfig", "preset", "verify_manifest"]
