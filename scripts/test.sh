#!/usr/bin/env bash
# The test command: builds the CMake targets (core library + Catch2 tests), runs ctest, then the
# Python suite. Expects `pip install --no-build-isolation -e .` to have been run (README).
# GPU tests run when a CUDA device is present and skip cleanly otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${MAX_JOBS:-$(nproc)}
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >build.log 2>&1 || { cat build.log; exit 1; }
cmake --build build -j "$jobs" >>build.log 2>&1 || { tail -50 build.log; exit 1; }
# Both suites run even when the first fails, so one run reports every failure.
status=0
(cd build && ctest --output-on-failure) || status=1
# With pytest-xdist the Python tests spread over the cores (350 s -> 227 s on 2 cores); a caller's
# own -n N comes later and wins. tests/python/conftest.py gives each worker its share of threads.
workers=()
python -c "import xdist" 2>/dev/null && workers=(-n auto)
python -m pytest -q tests/python "${workers[@]}" "$@" || status=1
exit $status
