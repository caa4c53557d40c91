"""`python -m experiments ablation --config ...` runs the ablation table; `python -m experiments figures` draws;
`python -m experiments compare ROWS.json A B` compares two rows seed by seed."""

if __name__ == "__main__":  # before the imports below: quiet their known third-party noise
    from common.cli import quiet_third_party_logs

    quiet_third_party_logs()

import sys

from common.cli import run


def main(argv: list[str]) -> int:
    commands = ("ablation", "figures", "compare")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m experiments {{{'|'.join(commands)}}} ... (each with --help)", file=sys.stderr)
        return 2
    if argv[0] == "ablation":
        from experiments.ablation import main as run
    elif argv[0] == "compare":
        from experiments.compare import main as run
    else:
        from experiments.figures import main as run
    return run(argv[1:]) or 0


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]))
