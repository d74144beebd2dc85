#!/usr/bin/env bash
# Evaluate run_helm.py results with HELM, offline, into benchmark_output/runs/<output_name>/ (see
# README.md in this folder): XSUM's and CNN/DailyMail's (cnn_dm) ROUGE-1/2/L, coverage, density and
# compression; MultiNews's ROUGE-1/2/L (multi_news); the needle's recall (needle, needle_essay).
#
#   cd helm && ./our_run.sh [jsonl] [task] [model_arch] [output_name] [max_eval_instances]
#   cd helm && jsonl=../xsum-llama-h2o.jsonl output_name=xsum-llama-h2o ./our_run.sh
#   cd helm && ./our_run.sh full=../full.jsonl,h2o=../h2o.jsonl xsum llama lab   # one suite, a model each
#
# Each knob is a positional argument (in this order) or a variable of the same name; an argument
# wins over a variable, a variable over the default:
#   jsonl               results of run_helm.py        default ../<task>-<model_arch>-full.jsonl
#                       or points NAME=FILE[,NAME=FILE...]: each file is the model
#                       h2o-lab/<model_arch>-NAME of the suite, which keeps its other points
#   task                xsum, cnn_dm, multi_news, needle or needle_essay: requests in ../data/<task>.jsonl  default xsum
#   model_arch          deployment h2o-lab/<model_arch>   default llama
#   output_name         HELM suite, folder under benchmark_output/runs/
#                                                       default: jsonl's file name less .jsonl
#                                                       (required with points)
#   max_eval_instances  evaluate the first N requests   default: as many as jsonl has results
# and, as a variable only, output_path: HELM's output folder (default helm/benchmark_output).
# Relative paths are relative to the folder you run it from.
set -euo pipefail
caller=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")"
die() { echo "our_run.sh: error: $*" >&2; exit 2; }
from_caller() { case $1 in /*) echo "$1" ;; *) echo "${caller}/$1" ;; esac; }  # relative to where we were run

task=${2:-${task:-xsum}}
# The task first, before anything is created: a task is a requests file ../data/<task>.jsonl.
[[ ${task} =~ ^[A-Za-z0-9_]+$ && -f ../data/${task}.jsonl ]] \
    || die "unknown task '${task}' (no data/${task}.jsonl; one of: $(cd ../data && ls *.jsonl | sed 's/\.jsonl$//' | paste -sd' '))"
model_arch=${3:-${model_arch:-llama}}
jsonl=${1:-${jsonl:-}}
files=()  # prepare's and check's arguments: --jsonl FILE, or --point NAME=FILE for each point
if [[ ${jsonl} =~ ^[A-Za-z0-9][A-Za-z0-9._-]*= ]]; then
    IFS=, read -ra pairs <<<"${jsonl}"
    for pair in "${pairs[@]}"; do
        files+=(--point "${pair%%=*}=$(from_caller "${pair#*=}")")
    done
    output_name=${4:-${output_name:-}}
    [[ -n ${output_name} ]] || die "output_name is required with points (NAME=FILE)"
else
    jsonl=${jsonl:+$(from_caller "${jsonl}")}
    jsonl=${jsonl:-${PWD%/*}/${task}-${model_arch}-full.jsonl}
    [[ -f ${jsonl} ]] || die "results file ${jsonl} does not exist (run_helm.py --output_path, or pass jsonl=...)"
    [[ -s ${jsonl} ]] || die "results file ${jsonl} is empty"
    files=(--jsonl "${jsonl}")
    output_name=${4:-${output_name:-$(basename "${jsonl}" .jsonl)}}
fi
max_eval_instances=${5:-${max_eval_instances:-}}
output_path=$(from_caller "${output_path:-${PWD}/benchmark_output}")

# HELM from the repository's virtualenv unless another one is active.
if ! command -v helm-run >/dev/null 2>&1 && [[ -x ../.venv/bin/helm-run ]]; then
    PATH="$(cd ../.venv/bin && pwd):${PATH}"
fi
command -v helm-run >/dev/null 2>&1 || die "helm-run not found: make venv, or activate the environment that has crfm-helm"
PYTHON=$(dirname "$(command -v helm-run)")/python
# helm-run imports lab_helm (plugins, results client) and h2o as installed packages; checked
# from / so that this folder cannot stand in for them.
(cd / && "${PYTHON}" -c "import h2o, lab_helm" 2>/dev/null) \
    || die "h2o-lab is not installed in ${PYTHON%/bin/python}: make venv, or pip install --no-deps -e ${PWD%/*}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1           # nothing below downloads; fail, never fetch

missing=$("${PYTHON}" -m lab_helm.offline --check 2>&1) || die "${missing}"

mkdir -p "${output_path}/logs"
exec 9>"${output_path}/.our_run.lock"  # one evaluation at a time: they share the scenario's data file
command -v flock >/dev/null 2>&1 && flock 9

# 1. Check the results against the requests HELM asks for; stage the scenario data and the
#    suite's prod_env (a model per results file).
staged=$("${PYTHON}" -m lab_helm.evaluate prepare "${files[@]}" --task "${task}" \
    --model-arch "${model_arch}" --suite "${output_name}" --output-path "${output_path}" \
    ${max_eval_instances:+--n "${max_eval_instances}"}) || exit 2
n=$(sed -n 1p <<<"${staged}")
env=$(sed -n 2p <<<"${staged}")
mapfile -t entries < <(sed -n '3,$p' <<<"${staged}")
echo "our_run.sh: ${n} results from ${jsonl} -> ${output_path}/runs/${output_name}/"

# 2. HELM computes the metrics; the h2o-lab client answers from each model's results file.
log=${output_path}/logs/${output_name}.helm-run.log
if ! helm-run --run-entries "${entries[@]}" --suite "${output_name}" --max-eval-instances "${n}" \
        --num-threads 1 --disable-cache --exit-on-error --plugins lab_helm.run_specs \
        --local-path "${env}" --output-path "${output_path}" >"${log}" 2>&1; then
    grep -E "Error|error:" "${log}" | tail -n 3 >&2 || true
    die "helm-run failed; its log: ${log}"
fi
"${PYTHON}" -m lab_helm.evaluate check "${files[@]}" --task "${task}" --model-arch "${model_arch}" --suite "${output_name}" \
    --output-path "${output_path}" || exit 2

# 3. Summaries for helm-server (runs.json, groups, ...) of the whole suite, under a schema whose
#    leaderboard compares its models on the suite's tasks.
schema=$("${PYTHON}" -m lab_helm.schema --suite "${output_name}" --output-path "${output_path}") || exit 2
log=${output_path}/logs/${output_name}.helm-summarize.log
helm-summarize --suite "${output_name}" --output-path "${output_path}" --schema-path "${schema}" \
    --local-path "${env}" >"${log}" 2>&1 || die "helm-summarize failed; its log: ${log}"
echo "our_run.sh: done: ${output_path}/runs/${output_name}/"
echo "our_run.sh: view: helm/serve_local.sh -o ${output_path} --suite ${output_name}"
