#!/usr/bin/env bash
# One-call GPU check: the most evidence one device call (timeout_s 540) can bring back, in this order, each stage
# under its own `timeout -s INT` (pytest and the benchmarks still print their summaries) and its output written to
# OUTDIR as soon as the stage ends, so a later stage that fails or runs out of time loses nothing before it:
#
#   env       install (editable, --no-deps, --no-build-isolation, the dry run too; carried wheels only for missing
#             packages), nvidia-smi, fastflamingo.info
#   selftest  python -m fastflamingo.selftest: every kernel family at every shipped config, forced, vs the PyTorch path
#   tests     the test suite natively on CUDA (-n 12, no -x, --maxfail=25 -rfE --durations=15; CPU-only AOT tests
#             skipped)
#   bench     calibration + the priority cells (docs/performance.md, "Priority cells"), ops in the order media_decode
#             (CUDA graphs included) -> gated_linear -> media_xattn -> perceiver_attn (-> idefics2_resampler, when
#             registered); FlexAttention and torch.compile providers wait for bench-compile
#   mllama    python -m benchmarks --ops mllama_xattn[,mllama_decode] --priority, only when the op is registered
#   tune      python -m benchmarks.tune: every candidate config timed at the priority shapes -> a tuned table
#   bench-compile  (optional: only with the time left) FlexAttention / torch.compile providers of the priority cells
#
#   benchmarks/device_check.sh OUTDIR                    # on the GPU machine, from the repository root
#   benchmarks/device_check.sh OUTDIR --dry-run          # every stage on CPU at toy sizes (CI-style wiring check)
#   benchmarks/device_check.sh OUTDIR --stage tune       # rerun one stage (repeatable) on a warm machine
#
# OUTDIR receives at most 8 files: summary.txt, selftest.txt, bench-priority.json, bench-mllama.json,
# bench-compile.json, the tuned table (<gpu>-sm<cc>-triton<x.y>.json), logs.tar.gz (every log and CSV). No PNGs:
# draw charts afterwards with `python -m benchmarks.plot FILE.json`.
#
# Environment: PYTHON (default python3; .venv/bin/python for --dry-run when present), DEVICE_CHECK_BUDGET (seconds
# for the whole script, default 525), FASTFLAMINGO_GIT_COMMIT (recorded in the results when .git did not travel).
set -u -o pipefail

usage() { echo "usage: benchmarks/device_check.sh OUTDIR [--dry-run] [--stage NAME]..." >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
OUT=$1
shift
DRY=0
ONLY=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --stage) [[ $# -ge 2 ]] || usage; ONLY+=("$2"); shift ;;
    *) usage ;;
  esac
  shift
done

STAGES=(env selftest tests bench mllama tune bench-compile)
# Per-stage limits (seconds) on the GPU. Their sum (495) plus packaging stays under the 525 s budget, which leaves
# 15 s of the device call's 540 s for the transfer of OUTDIR; bench-compile only gets what is left.
declare -A LIMIT=([env]=40 [selftest]=140 [tests]=120 [bench]=110 [mllama]=30 [tune]=55 [bench-compile]=120)
BUDGET=${DEVICE_CHECK_BUDGET:-525}
if [[ $DRY == 1 ]]; then
  # a CPU runs the kernels under the interpreter, several times slower than a GPU compiles and runs them: the dry run
  # checks the wiring and the stage order, with 4x the limits
  for name in "${!LIMIT[@]}"; do LIMIT[$name]=$((LIMIT[$name] * 4)); done
  BUDGET=${DEVICE_CHECK_BUDGET:-2400}
fi
for name in "${ONLY[@]}"; do
  [[ -v "LIMIT[$name]" ]] || { echo "unknown stage '$name'; stages: ${STAGES[*]}" >&2; exit 2; }
done

cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/device-check-logs.XXXXXX")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device-check-work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [[ $DRY == 1 && -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
DRY_FLAG=()
[[ $DRY == 1 ]] && DRY_FLAG=(--dry-run)
T0=$SECONDS
RESULTS=()      # one "stage|rc|seconds|note" line per stage run
STAGE_LIMIT=0   # limit of the stage running now (seconds)

elapsed() { echo $((SECONDS - T0)); }

# Limit of a stage: its own, capped by what is left of the budget (10 s kept for the final packaging).
stage_limit() {
  local left=$((BUDGET - $(elapsed) - 10))
  local own=${LIMIT[$1]}
  echo $((own < left ? own : left))
}

# t COMMAND...: run under the stage's limit. SIGINT may come ignored from the caller (a non-interactive parent); the
# python shim resets it before exec, so timeout's INT stops the command the way Ctrl-C would and pytest and the
# benchmarks still print their summaries (-k: KILL 15 s later if INT was not enough).
t() {
  timeout -s INT -k 15 "$STAGE_LIMIT" "$PY" -c \
    'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' "$@"
}

pack() {
  # logs bundled into one file; rewritten after every stage so a killed run still returns what it has
  tar -czf "$OUT/logs.tar.gz.tmp" -C "$LOGS" . 2> /dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
  {
    local commit=${FASTFLAMINGO_GIT_COMMIT:-$(git rev-parse --short HEAD 2> /dev/null || echo unknown)}
    echo "fastflamingo device check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $commit$([[ $DRY == 1 ]] && echo ', dry run on CPU')"
    printf '%-14s %4s %5s  %s\n' stage rc sec result
    local name rc secs note
    for line in "${RESULTS[@]}"; do
      IFS='|' read -r name rc secs note <<< "$line"
      printf '%-14s %4s %5s  %s\n' "$name" "$rc" "$secs" "$note"
    done
    if [[ -f "$LOGS/env.log" ]]; then echo; echo "--- environment"; cat "$LOGS/env.log"; fi
    if [[ -f "$LOGS/tests.log" ]]; then echo; echo "--- tests (last 40 lines)"; tail -n 40 "$LOGS/tests.log"; fi
  } > "$OUT/summary.txt"
}

# run_stage NAME: stage_NAME under the stage's limit, output to $LOGS/NAME.log, one result line.
run_stage() {
  local name=$1
  STAGE_LIMIT=$(stage_limit "$name")
  if ((STAGE_LIMIT < 10)); then
    echo "== [$(elapsed)s] $name: skipped (no time left in the ${BUDGET}s budget)"
    RESULTS+=("$name|-|0|skipped: no time left")
    return 0
  fi
  echo "== [$(elapsed)s] $name (limit ${STAGE_LIMIT}s, log $name.log)"
  local start=$SECONDS rc note
  "stage_${name//-/_}" > "$LOGS/$name.log" 2>&1
  rc=$?
  note=$(grep -v '^[[:space:]]*$' "$LOGS/$name.log" | tail -n 1 | tr -s ' \t' ' ' | cut -c1-160)
  if ((rc == 124 || rc == 130 || rc == 137)); then note="TIMEOUT (${STAGE_LIMIT}s); last line: $note"; fi
  echo "   exit $rc in $((SECONDS - start))s: $note"
  RESULTS+=("$name|$rc|$((SECONDS - start))|$note")
}

# The newest results JSON of a benchmarks run in $1 -> $OUT/$2; its CSV goes to the logs.
collect_bench() {
  local json csv
  json=$(ls -t "$1"/*.json 2> /dev/null | head -n 1)
  [[ -n "$json" ]] && cp "$json" "$OUT/$2"
  for csv in "$1"/*.csv; do [[ -e "$csv" ]] && cp "$csv" "$LOGS/${2%.json}.csv"; done
  return 0
}

# has_op NAME: whether the benchmark op is registered in this tree (a failing --list is reported, not taken as "no")
has_op() {
  local list
  list=$("$PY" -m benchmarks --list 2>&1) || { echo "benchmarks --list failed: ${list: -400}"; return 1; }
  grep -q "^$1:" <<< "$list"
}

stage_env() {
  echo "--- install"
  local whl dist
  # the same install in the dry run (into the checkout's own environment, where it is already there: a no-op but for
  # the build), so the dry run proves it works beside the environment's transformers and Hugging Face's `kernels`
  "$PY" -c 'import importlib.metadata as m
for d in ("torch", "triton", "transformers", "kernels"):
    try: print(d, m.version(d), end="; ")
    except m.PackageNotFoundError: print(d, "missing", end="; ")
print()'
  if [[ $DRY == 1 ]] && ! "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    echo "dry run: $PY is not a virtual environment's interpreter; install skipped (it would change that Python)"
  elif t "$PY" -m pip --disable-pip-version-check install --no-deps --no-build-isolation -e . > "$WORK/install.log" 2>&1
  then
    tail -n 2 "$WORK/install.log"
  else
    tail -n 40 "$WORK/install.log"  # the whole error: a failed install stops the stage
    return 1
  fi
  "$PY" -m pip show fastflamingo 2>&1 | grep -E "^(Name|Version|Editable project location|Location):"
  for whl in benchmarks/wheels/*.whl; do
    [[ -e "$whl" ]] || continue
    dist=$(basename "$whl" | cut -d- -f1)
    if "$PY" -m pip show "$dist" > /dev/null 2>&1; then
      echo "carried wheel $(basename "$whl"): $dist already installed, kept"
    elif [[ $DRY == 1 ]]; then
      echo "carried wheel $(basename "$whl"): $dist missing, would be installed"
    else
      t "$PY" -m pip --disable-pip-version-check install --no-deps "$whl" 2>&1 | tail -n 1
    fi
  done
  echo "--- nvidia-smi"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm,power.limit --format=csv
    nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  echo "--- python -m fastflamingo.info"
  t "$PY" -m fastflamingo.info
}

stage_selftest() {
  # eight processes on the GPU machine (the first compiles run in parallel), both cores of a CPU for the dry run
  t "$PY" -m fastflamingo.selftest "${DRY_FLAG[@]}" --jobs "$([[ $DRY == 1 ]] && echo 2 || echo 8)" \
    | tee "$OUT/selftest.txt"
}

stage_tests() {
  local args=(-q -p no:cacheprovider --maxfail=25 -rfE --durations=15)
  if [[ $DRY == 1 ]]; then
    # CPU: the kernels run under the Triton interpreter; a slice of one file proves the wiring, not the numerics
    args+=(-n 2 tests/test_api.py -k "backend or mask")
  else
    "$PY" -c "import xdist" 2> /dev/null && args+=(-n 12)
    args+=(tests --ignore=tests/test_aot.py)  # the AOT tests compile for sm_80/sm_90 on the CPU: nothing to learn here
  fi
  t "$PY" -m pytest "${args[@]}"
}

deadline() { local d=$((STAGE_LIMIT - $1)); echo $((d < 5 ? 5 : d)); }

BENCH_EXCLUDE='flex*,compile*'
stage_bench() {
  local ops=media_decode,gated_linear,media_xattn,perceiver_attn
  has_op idefics2_resampler && ops+=,idefics2_resampler  # last: the stage's deadline never cuts the kernels' cells
  t "$PY" -m benchmarks --priority --ops "$ops" \
    --exclude-providers "$BENCH_EXCLUDE" --out "$WORK/bench" --deadline "$(deadline 25)" "${DRY_FLAG[@]}"
  local rc=$?
  collect_bench "$WORK/bench" bench-priority.json
  return $rc
}

stage_mllama() {
  if ! has_op mllama_xattn; then
    echo "mllama_xattn: the op is not registered in this tree; nothing to run"
    return 0
  fi
  local ops=mllama_xattn
  has_op mllama_decode && ops+=,mllama_decode
  t "$PY" -m benchmarks --ops "$ops" --priority --exclude-providers "$BENCH_EXCLUDE" --out "$WORK/mllama" \
    --deadline "$(deadline 10)" "${DRY_FLAG[@]}"
  local rc=$?
  collect_bench "$WORK/mllama" bench-mllama.json
  return $rc
}

stage_tune() {
  t "$PY" -m benchmarks.tune "$WORK/tune" "${DRY_FLAG[@]}"
  local rc=$? table
  for table in "$WORK"/tune/*.json; do [[ -e "$table" ]] && cp "$table" "$OUT/"; done
  return $rc
}

stage_bench_compile() {
  local ops=media_xattn,perceiver_attn,gated_linear
  has_op mllama_xattn && ops+=,mllama_xattn
  t "$PY" -m benchmarks --priority --ops "$ops" --providers 'flex*,compile,fastflamingo' --out "$WORK/compile" \
    --deadline "$(deadline 25)" "${DRY_FLAG[@]}"
  local rc=$?
  collect_bench "$WORK/compile" bench-compile.json
  return $rc
}

echo "fastflamingo device check -> $OUT (budget ${BUDGET}s$([[ $DRY == 1 ]] && echo ', dry run on CPU'))"
for name in "${STAGES[@]}"; do
  if ((${#ONLY[@]})); then
    [[ " ${ONLY[*]} " == *" $name "* ]] || continue
  elif [[ $name == bench-compile ]] && (($(stage_limit bench-compile) < 30)); then
    echo "== [$(elapsed)s] bench-compile: skipped (optional; under 30 s left)"
    RESULTS+=("bench-compile|-|0|skipped: optional, under 30 s left")
    continue
  fi
  run_stage "$name"
  pack
done
pack

echo "== [$(elapsed)s] summary"
sed -n '1,/^$/p' "$OUT/summary.txt"
if [[ -f "$OUT/bench-priority.json" ]]; then "$PY" -m benchmarks.report --text "$OUT/bench-priority.json"; fi
echo "files in $OUT: $(find "$OUT" -type f | wc -l) (at most 8)"
(cd "$OUT" && find . -type f | sed 's|^\./|  |' | sort)
echo "== done in $(elapsed)s"
failed=0
for line in "${RESULTS[@]}"; do
  IFS='|' read -r _ rc _ _ <<< "$line"
  [[ $rc == - || $rc == 0 ]] || failed=1
done
exit $failed
