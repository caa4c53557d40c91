"""`python -m scale estimate --config configs/salmonn13b-gemma2b/estimate.yaml --gpu v100-32gb [key=value ...]`."""

if __name__ == "__main__":  # before the imports below: quiet their known third-party noise
    from common.cli import quiet_third_party_logs

    quiet_third_party_logs()

import sys

from common.cli import run

COMMANDS = {"estimate": "scale.estimate"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m scale {{{','.join(COMMANDS)}}} --config FILE [--gpu NAME] [key=value ...]",
              file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]))
