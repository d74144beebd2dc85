#!/usr/bin/env bash
# The recent window alone, 20%: bash scripts/helm/local.sh [task] [model] [model_arch] [flags...]
source "$(dirname "$0")/common.sh"
parse_args "$@"
run_mode local --enable_small_cache --heavy_ratio 0 --recent_ratio 0.2
