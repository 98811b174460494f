#!/usr/bin/env bash
# The embedded default: real data (scikit-learn digits) -> 2-process training -> zero-shot -> convert.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] && source .venv/bin/activate
megaclip models
