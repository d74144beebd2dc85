#!/usr/bin/env bash
# The local baseline, a 20% recent window: bash scripts/lm_eval/local.sh [task] [model] [model_arch] [flags...]
source "$(dirname "$0")/common.sh"
parse_args "$@"
run_mode local --heavy_ratio 0 --recent_ratio 0.2 --enable_small_cache
