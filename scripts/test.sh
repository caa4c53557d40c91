#!/usr/bin/env bash
# Run smolt's tests: ruff (the rules in pyproject.toml), then pytest. Sets up .venv on first use. Extra arguments go
# to pytest (e.g. -k fbank, -m "not slow").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$ROOT/.venv/bin/ruff" check --quiet . || { echo "ruff found the problems above (ruff check --fix mends many)" >&2; exit 1; }
exec "$ROOT/.venv/bin/python" -m pytest tests "$@"
