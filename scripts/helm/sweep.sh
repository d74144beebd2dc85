#!/usr/bin/env bash
# Budget sweep: bash scripts/helm/sweep.sh [task] [model] [model_arch] [h2o.lab.sweep flags...]
# task: xsum (default), cnn_dm, multi_news, needle or needle_essay.
# Full cache, then h2o, local and every other registered policy at 4, 10, 20 and 40% of the prompt,
# each scored by HELM and against the full cache; report in reports/<task>-<model>/.
# Resumable: finished points are never recomputed. Flags: --n (articles, 200), --fidelity_n (50),
# --batch_size, --dtype bfloat16, --budgets 0.1,0.2, --policies h2o,local (python -m h2o.lab.sweep --help).
source "$(dirname "$0")/common.sh"  # repository root, PYTHON
task=${1:-xsum}
model=${2:-smollm2}
model_arch=${3:-llama}
shift $(( $# < 3 ? $# : 3 ))
exec "${PYTHON}" -u -m h2o.lab.sweep --task "${task}" --model "${model}" --arch "${model_arch}" "$@"
