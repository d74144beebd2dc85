#!/usr/bin/env bash
# The full cache: bash scripts/lm_eval/full.sh [task] [model] [model_arch] [flags...]
source "$(dirname "$0")/common.sh"
parse_args "$@"
run_mode full
