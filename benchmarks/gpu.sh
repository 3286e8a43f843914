#!/usr/bin/env bash
# The prepared GPU benchmark: one run (<= 8 minutes on one H100/H200), one table.
#
#   bash benchmarks/gpu.sh              # on a CUDA machine
#   bash benchmarks/gpu.sh --dry-run    # CPU smoke test at tiny sizes
#
# Generates its own stores (no downloads). Without a CUDA GPU it says so and exits 0.
# PYTHON selects the interpreter (default: python3 on PATH). See benchmarks/gpu.py for options.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
cat /proc/loadavg 2>/dev/null | sed 's/^/load average at start: /' || true
exec "${PYTHON:-python3}" "$here/gpu.py" "$@"
