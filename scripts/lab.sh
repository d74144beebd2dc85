#!/usr/bin/env bash
# `make lab`: full, h2o and local on the first LAB_N XSUM requests with the embedded
# SmolLM2-135M-Instruct, each evaluated by HELM offline, then one table. Reruns reuse what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${LAB_N:-20}
batch=${LAB_BATCH:-4}
mkdir -p out/lab
suites=()
for mode in full h2o local; do
    results=out/lab/xsum-llama-${mode}-${n}.jsonl
    echo "== ${mode}: generating ${n} XSUM summaries -> ${results}"
    OUTPUT=${results} bash scripts/helm/${mode}.sh xsum smollm2 llama --sample_num "${n}" --batch_size "${batch}"
    echo "== ${mode}: HELM evaluation -> helm/benchmark_output/runs/lab-${mode}-${n}"
    (cd helm && ./our_run.sh "../${results}" xsum llama "lab-${mode}-${n}")
    suites+=("lab-${mode}-${n}=${mode}")
done
bash helm/lab_table.sh "${suites[@]}"
