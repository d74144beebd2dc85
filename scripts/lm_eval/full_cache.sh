#!/usr/bin/env bash
# The paper repository's name for full.sh.
exec bash "$(dirname "$0")/full.sh" "$@"
