"""Stand-in for the `msclap` package, installed by smolt's setup so that `import aac_metrics` works.

aac-metrics imports `msclap.CLAP` at import time for its CLAP-based metrics (CLAP-sim, MACE). The real
msclap pulls in torchaudio, which has no build for torch 2.13, and downgrades transformers. smolt does
not report CLAP-based metrics, so this module only exists to make the import succeed; using CLAP raises.
"""

_WHY = (
    "CLAP-based caption metrics (clap_sim, mace) are not available in smolt's environment: the real "
    "`msclap` package needs torchaudio, which has no build for torch 2.13. smolt reports CIDEr-D, SPICE, "
    "SPIDEr, METEOR, BLEU-4 and ROUGE-L instead."
)


class CLAP:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(_WHY)
