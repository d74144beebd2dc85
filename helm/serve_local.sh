#!/usr/bin/env bash
# helm-server, reachable from this machine only: helm-server has no host option and listens on
# 0.0.0.0 (every interface); this runs it on 127.0.0.1 (or --host ADDR). Other arguments go to
# helm-server: ./serve_local.sh --suite xsum-llama-full --port 8000
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if ! command -v helm-server >/dev/null 2>&1 && [[ -x ../.venv/bin/helm-server ]]; then
    PATH="$(cd ../.venv/bin && pwd):${PATH}"
fi
PYTHON=$(dirname "$(command -v helm-server)")/python
exec "${PYTHON}" -m lab_helm.serve "$@"
