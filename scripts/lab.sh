#!/usr/bin/env bash
# `make lab`: full, h2o and local on the first LAB_N requests of LAB_TASK (xsum, cnn_dm, multi_news,
# needle or needle_essay; default xsum) with the embedded SmolLM2-135M-Instruct, evaluated by HELM offline as one
# suite (a model per mode, side by side in helm-server's leaderboard), then one table. Reruns reuse
# what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
task=${LAB_TASK:-xsum}
n=${LAB_N:-20}
batch=${LAB_BATCH:-4}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
# An lm-eval task (copa, openbookqa, piqa, winogrande, rte, mathqa): the paper's three lm-eval
# steps for each mode, then an accuracy table (h2o.lab.lm_eval_lab).
if [[ -f h2o/serve/lm_eval/tasks/${task}.yaml ]]; then
    exec "${PYTHON}" -m h2o.lab.lm_eval_lab --task "${task}" --limit "${n}" --batch_size "${batch}"
fi
[[ -f data/${task}.jsonl ]] || { echo "lab.sh: LAB_TASK=${task}: no data/${task}.jsonl (xsum, cnn_dm, multi_news, needle, needle_essay) and no lm-eval task of that name (copa, openbookqa, piqa, winogrande, rte, mathqa)" >&2; exit 2; }
mkdir -p out/lab
points=()
for mode in full h2o local; do
    results=out/lab/${task}-llama-${mode}-${n}.jsonl
    echo "== ${mode}: generating ${n} ${task} answers -> ${results}"
    OUTPUT=${results} bash scripts/helm/${mode}.sh "${task}" smollm2 llama --sample_num "${n}" --batch_size "${batch}"
    points+=("${mode}=../${results}")
done
suite=lab-${n}
[[ ${task} == xsum ]] || suite=lab-${task}-${n}
echo "== HELM evaluation of full, h2o and local -> helm/benchmark_output/runs/${suite}"
(IFS=,; cd helm && ./our_run.sh "${points[*]}" "${task}" llama "${suite}")
bash helm/lab_table.sh "${suite}"
echo "== compare them in HELM's viewer: helm/serve_local.sh --suite ${suite}, then http://127.0.0.1:8000"
