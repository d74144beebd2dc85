# Shared by full.sh, h2o.sh, local.sh (`run_mode NAME ARGS...` after `parse_args "$@"`) and sweep.sh.
# Usage of full, h2o and local: [task] [model] [model_arch] [extra run_helm.py flags...]
# Defaults: xsum, the embedded SmolLM2-135M-Instruct, llama. Output: <task>-<model_arch>-<mode>.jsonl
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

parse_args() {
    task=${1:-xsum}
    model=${2:-smollm2}
    model_arch=${3:-llama}
    shift $(( $# < 3 ? $# : 3 ))
    extra=("$@")
    input_data=data/${task}.jsonl
    if [[ ! -f ${input_data} ]]; then
        echo "$(basename "$0"): no requests for task '${task}': ${input_data} does not exist" >&2
        exit 2
    fi
}

run_mode() {
    local mode=$1; shift
    "${PYTHON}" -u run_helm.py \
        --input_path "${input_data}" \
        --output_path "${OUTPUT:-${task}-${model_arch}-${mode}.jsonl}" \
        --model_name "${model}" \
        --model_arch "${model_arch}" \
        "$@" "${extra[@]}"
}
