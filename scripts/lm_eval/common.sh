# Shared by full.sh, h2o.sh, local.sh and prepare_data.sh: the paper's three lm-eval steps
# (h2o_hf/scripts/lm_eval/*.sh), run from the repository root.
# Usage: bash scripts/lm_eval/MODE.sh [task] [model] [model_arch] [extra run_lm_eval_harness.py flags...]
# Defaults: copa, the embedded SmolLM2-135M-Instruct, llama; 5 shots as in the paper (SHOTS=...).
# LIMIT=N keeps the first N documents of the task. Files: <task>-<shots>.jsonl (requests),
# <task>-<shots>-<model_arch>-<mode>.jsonl (results), <task>-<shots>-<model_arch>-<mode>.json (metrics).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

parse_args() {
    task=${1:-copa}
    model=${2:-smollm2}
    model_arch=${3:-llama}
    shift $(( $# < 3 ? $# : 3 ))
    extra=("$@")
    shots=${SHOTS:-5}
    limit=(${LIMIT:+--limit "${LIMIT}"})
    requests=${task}-${shots}.jsonl
}

# Step 1, the task's requests (redone each time, as in the paper's scripts: cheap).
prepare() {
    "${PYTHON}" -u generate_task_data.py --output-file "${requests}" --task-name "${task}" \
        --num-fewshot "${shots}" "${limit[@]}"
}

# Steps 2 and 3 for one mode: `run_mode NAME FLAGS...`.
run_mode() {
    local mode=$1; shift
    local results=${OUTPUT:-${task}-${shots}-${model_arch}-${mode}.jsonl}
    prepare
    "${PYTHON}" -u run_lm_eval_harness.py --input-path "${requests}" --output-path "${results}" \
        --model-name "${model}" --model-type "${model_arch}" "$@" "${extra[@]}"
    "${PYTHON}" -u evaluate_task_result.py --result-file "${results}" --task-name "${task}" \
        --num-fewshot "${shots}" --model-type "${model_arch}" "${limit[@]}" --output "${results%.jsonl}.json"
}
