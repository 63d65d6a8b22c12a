#!/usr/bin/env bash
# One call on the GPU machine: build with all cores, run the whole test suite (CUDA tests
# included), then the op benchmark. Logs and results go under $OUT (or ./out).
# Usage: scripts/gpu_session.sh [pytest args...]    (GKV_SKIP_BENCH=1 skips the benchmark)
# A suite longer than one call (10 minutes): `scripts/gpu_session.sh -n 14 --shard 0/4`, then 1/4,
# 2/4 and 3/4 (a third took about 470 s of tests on an H100, before each xdist worker's ATen
# threads were capped to its share of the cores).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
start=$(date +%s)
# The device copies the tree anew for each call, so every source looks modified to ninja and a
# warm machine would rebuild the extension (about 2 minutes); a hash of the sources decides.
sources=$(find csrc setup.py -type f | sort | xargs sha256sum | sha256sum)
stamp=build/extension-sources.sha256
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sources" ] && ls gkv_ext/_C*.so >/dev/null 2>&1; then
  echo "build: sources unchanged since the last build here, kept"
else
  python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1 \
    || { tail -60 "$OUT/build.log"; exit 1; }
  mkdir -p build && echo "$sources" >"$stamp"
  echo "build: $(( $(date +%s) - start )) s"
fi
# test.log names each test as it ends (-v twice: test.sh passes -q), so a run cut off by the
# call's time limit still says which tests failed; the console gets the failed tests, the
# summaries and the slowest tests (what to trim when the suite outgrows its calls).
scripts/test.sh -v -v --durations=15 "$@" 2>&1 | tee "$OUT/test.log" | grep -E --line-buffered \
  '(FAILED|ERROR)( |$)|[0-9]+ (passed|failed)|tests passed|Errors while|^[0-9.]+s (call|setup) '
if [ -z "${GKV_SKIP_BENCH:-}" ]; then
  python3 scripts/bench_ops.py --out "$OUT/benchmarks_ops" ${GKV_BENCH_ARGS:-} 2>&1 | grep -v '%|' | tee "$OUT/bench.log"
fi
