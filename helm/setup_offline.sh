#!/usr/bin/env bash
# Offline set-up for HELM's XSUM metrics, after `pip install`: installs a spaCy en_core_web_sm
# stand-in (blank English tokenizer) and a placeholder for nltk's punkt_tab into the environment
# of $PYTHON (default: the repository's .venv). Idempotent; needs no network. Details:
# helm/lab_helm/offline.py.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-$([ -x "${here}/../.venv/bin/python" ] && echo "${here}/../.venv/bin/python" || echo python3)}
exec "${PYTHON}" -m lab_helm.offline "$@"
