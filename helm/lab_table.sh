#!/usr/bin/env bash
# One table (mode, KV budget, rouge_1/2/L, KV MiB, tok/s, n) for suites our_run.sh evaluated:
#   helm/lab_table.sh xsum-llama-full xsum-llama-h2o xsum-llama-local
# SUITE=LABEL sets a row's mode label. Details: helm/lab_helm/table.py.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-$([ -x "${here}/../.venv/bin/python" ] && echo "${here}/../.venv/bin/python" || echo python3)}
PYTHONPATH="${here}:${here}/..${PYTHONPATH:+:${PYTHONPATH}}" exec "${PYTHON}" -m lab_helm.table --output-path "${here}/benchmark_output" "$@"
