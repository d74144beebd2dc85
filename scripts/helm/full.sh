#!/usr/bin/env bash
# Full KV cache (transformers' own): bash scripts/helm/full.sh [task] [model] [model_arch] [flags...]
source "$(dirname "$0")/common.sh"
parse_args "$@"
run_mode full
