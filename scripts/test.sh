#!/usr/bin/env bash
# Run smolt's tests. Sets up .venv on first use. Extra arguments go to pytest (e.g. -k fbank, -m "not slow").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest tests "$@"
