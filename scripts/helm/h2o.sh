#!/usr/bin/env bash
# H2O at 10% heavy hitters + 10% recent: bash scripts/helm/h2o.sh [task] [model] [model_arch] [flags...]
source "$(dirname "$0")/common.sh"
parse_args "$@"
run_mode h2o --enable_small_cache --heavy_ratio 0.1 --recent_ratio 0.1
