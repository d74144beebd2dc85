#!/usr/bin/env bash
# Export stage: regenerate data/<task>.jsonl (run_helm.py's input) with `helm-run --dry-run` from
# the vendored articles, with the run entry, deployment, tokenizer and instance selection that
# our_run.sh evaluates with. Offline.
#   helm/export_requests.sh [--task xsum] [--n N] [--output FILE | --check]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-$([ -x "${here}/../.venv/bin/python" ] && echo "${here}/../.venv/bin/python" || echo python3)}
exec "${PYTHON}" -m lab_helm.export "$@"
