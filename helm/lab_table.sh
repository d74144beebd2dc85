#!/usr/bin/env bash
# One table (mode, KV budget, rouge_1/2/L, KV MiB, tok/s, n), a row per results file of the suites
# our_run.sh evaluated:
#   helm/lab_table.sh xsum-llama-full xsum-llama-h2o xsum-llama-local
#   helm/lab_table.sh lab-20                  (one suite, a row per point)
# SUITE=LABEL sets the mode label of the suite's rows. Details: helm/lab_helm/table.py.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-$([ -x "${here}/../.venv/bin/python" ] && echo "${here}/../.venv/bin/python" || echo python3)}
exec "${PYTHON}" -m lab_helm.table --output-path "${here}/benchmark_output" "$@"
