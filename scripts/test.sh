#!/usr/bin/env bash
# Lint, then the test suite (unit + integration against a real tritonserver on CPU). Works from any directory.
#   scripts/test.sh [pytest args...]        e.g. scripts/test.sh -k stream -x
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" --dev
cd "$ROOT"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
