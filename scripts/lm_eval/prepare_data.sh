#!/usr/bin/env bash
# Step 1 alone, the task's requests: bash scripts/lm_eval/prepare_data.sh [task]
source "$(dirname "$0")/common.sh"
parse_args "$@"
prepare
