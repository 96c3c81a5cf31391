#!/usr/bin/env bash
# The GPU proof in one call, for the day a device is lent: the CUDA tests, then the GPU benchmarks, their tables
# appended to docs/benchmarks.md (and copied to $OUT, so that they come back from the device machine).
#
#   bash scripts/gpu_check.sh prepare     # here, with internet to PyPI: the wheels the device image lacks, into .whl/
#   bash scripts/gpu_check.sh run         # there: run(command="bash scripts/gpu_check.sh run", carry=[".whl", "weights"])
#
# At most 8 minutes on an H100 or H200 (each step has its own limit). Loupe runs eager: the first x4plus compile
# alone takes about 150 s. GPU_CHECK_COMPILE=1 compiles it (shared by every Loupe contender through the compile
# cache): run that as a second call, where the device time allows.
set -uo pipefail
cd "$(dirname "$0")/.."

# What the device image (Python 3.12, torch 2.11) lacks of Loupe's dependencies; the rest is there already.
WHEELS=(spandrel==0.4.2 fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv annotated-types
        typing-inspection uvicorn python-multipart aura-sr==0.0.4)

prepare() {
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  rm -rf .whl && mkdir -p .whl
  for wheel in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$wheel" || { echo "gpu_check: no wheel for $wheel" >&2; exit 1; }
  done
  ls weights/*.safetensors >/dev/null 2>&1 || { echo "gpu_check: no weights: run make weights first" >&2; exit 1; }
  du -shc .whl weights | tail -1
}

step() {  # step SECONDS NAME COMMAND...: one part of the check; a failure is reported and the rest goes on
  local limit=$1 name=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit $status after $((SECONDS - started))s" | tee -a "$LOG"
  STATUS+=("$name: exit $status")
}

run() {
  OUT=${OUT:-$(mktemp -d)}
  LOG=$OUT/gpu_check.log
  STATUS=()
  export PYTHONUNBUFFERED=1
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG"
  local compile=() bench=(python3 -m scripts.bench --preset gpu --repeats 3)
  [ "${GPU_CHECK_COMPILE:-0}" = 1 ] || compile=(--no-compile)
  step 110 "CUDA tests" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
  step 200 "x4plus 1024² → 4096²" "${bench[@]}" "${compile[@]}" --size 1024 --write docs/benchmarks.md \
    --contenders reference comfyui raw loupe-executor loupe-engine loupe-file loupe-http
  # At 2560² ComfyUI's fp32 tiles and a bare full frame (about 50 GiB) would take the step's time for nothing new.
  step 110 "x4plus 2560² → 10240²" "${bench[@]}" "${compile[@]}" --size 2560 --write docs/benchmarks.md \
    --contenders reference loupe-engine loupe-file loupe-http
  step 60 "AuraSR 256² → 1024²" bash -o pipefail -c "python3 -m scripts.bench_aura --side 256 --runs 3 | tee '$OUT/aura.md'"
  if [ -s "$OUT/aura.md" ]; then
    { printf '\n## %s: CUDA, AuraSR 256² → 1024²\n\nCommand: `python -m scripts.bench_aura --side 256 --runs 3` ' "$(date -I)"
      printf '(from scripts/gpu_check.sh)\n\n'; cat "$OUT/aura.md"; } >> docs/benchmarks.md
  fi
  cp docs/benchmarks.md "$OUT/benchmarks.md"
  printf '%s\n' "${STATUS[@]}" | tee "$OUT/status.txt"
}

case "${1:-run}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
