#!/usr/bin/env bash
# H2O at 10% heavy hitters + 10% recent: bash scripts/lm_eval/h2o.sh [task] [model] [model_arch] [flags...]
source "$(dirname "$0")/common.sh"
parse_args "$@"
run_mode h2o --heavy_ratio 0.1 --recent_ratio 0.1 --enable_small_cache
