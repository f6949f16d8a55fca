#!/usr/bin/env bash
# The GPU acceptance run in one script: an offline build of the CUDA extension, the packages the image lacks
# installed from carried wheels, then the whole test suite (the `cuda` tests included), with logs.
#
# For a machine with a CUDA GPU whose Python already holds torch, triton, transformers and pytest, and that
# reaches no package index (e.g. the lent H100/H200 image: python3 is a venv with torch 2.11+cu130).
#
#   here, with an index, once:  make wheels          # soundfile, cffi, pycparser for CPython 3.12 -> .wheels/
#   there, from the repo root:  bash benchmarks/gpu_check.sh
#                               (.wheels/ is git-ignored: carry it along with the working tree)
# On a lent machine: one call, carry [".wheels"], timeout_s 600: the build takes 2-3 minutes, the tests at most
# PYTEST_BUDGET_S. A rerun of what failed: TESTS="tests/test_x.py::test_y ..." PYTEST_BUDGET_S=120.
#
# Settings (environment): PY (default python3), WHEELS (.wheels), OUT (./out/gpu-check, git-ignored), PYTEST_BUDGET_S
# (seconds for the whole pytest run, default 420; pytest is interrupted then and still writes its report),
# PYTEST_WORKERS (parallel pytest workers when pytest-xdist is there, default 4; 0 for none), TESTS (test
# paths to run instead of the whole suite, e.g. for a rerun of what failed).
# Writes to $OUT: env.txt (versions, compiler and link settings), build.log (compile and link lines),
# symbols.txt (what the built extension links and exports), pytest.log, junit.xml (with the recorded
# numbers, e.g. the bf16/fp32 greedy agreement), summary.txt (also printed last).
# Exit status: the build's when it fails, else pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=${WHEELS:-.wheels}
OUT=${OUT:-$PWD/out/gpu-check}
PYTEST_BUDGET_S=${PYTEST_BUDGET_S:-420}
PYTEST_WORKERS=${PYTEST_WORKERS:-4}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

# ------------------------------------------------------------------ the machine, the toolchain, the flags
{
  echo "## date: $(date -u +%FT%TZ)"
  nvidia-smi -L 2>&1
  "$PY" - <<'EOF' 2>&1
import os, sys, sysconfig
print("python", sys.version.split()[0], sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("triton", "transformers", "setuptools", "pip", "soundfile", "pytest", "xdist", "pytest_timeout"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError as exc:
        print(name, "MISSING", exc)
for var in ("CC", "CXX", "LDSHARED", "LDCXXSHARED", "CFLAGS", "LDFLAGS", "CCSHARED"):
    print(f"sysconfig {var}:", sysconfig.get_config_var(var))
for var in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST"):
    print(f"env {var}:", os.environ.get(var))
EOF
  command -v nvcc && nvcc --version | tail -2
  g++ --version | head -1
  echo "g++ libstdc++.so: $(g++ -print-file-name=libstdc++.so)"
  echo "g++ libstdc++.a: $(g++ -print-file-name=libstdc++.a)"
} >"$OUT/env.txt" 2>&1

# ---------------------------------------------------------------------------------- the offline build
# make's targets are the ones CI uses (`make build` never reaches an index); PIP_VERBOSE=2 outweighs their
# --quiet, so the compile and link commands land in the log.
build_status=0
if command -v make >/dev/null; then
  PIP_VERBOSE=2 MAX_JOBS=16 make build PY="$PY" OFFLINE=1 WHEELS="$WHEELS" >"$OUT/build.log" 2>&1 || build_status=$?
else
  {
    "$PY" -c "import soundfile" 2>/dev/null || "$PY" -m pip install --no-index --find-links "$WHEELS" soundfile
    MAX_JOBS=16 "$PY" -m pip install -v --no-index --no-build-isolation --no-deps -e .
  } >"$OUT/build.log" 2>&1 || build_status=$?
fi

library=$(ls enginepy/_C*.so 2>/dev/null | head -1)
{
  echo "library: $library"
  echo "needs libstdc++.so.6: $(readelf -d "$library" | grep -c 'NEEDED.*libstdc++')"
  echo "libstdc++ definitions it exports (want 0): $(nm -D --defined-only -C "$library" |
    awk '$2 ~ /^[TDBR]$/ { sub(/^[^ ]+ [^ ]+ /, ""); print }' |
    grep -cE '^((vtable|VTT|typeinfo|typeinfo name) for )?(std::|__gnu_cxx::)')"
  echo "## dynamic section"
  readelf -d "$library" | grep -E "NEEDED|FLAGS|SONAME"
  echo "## std::ostream::_M_insert symbols in the library (U = taken from libstdc++.so.6)"
  nm -C "$library" | grep "_M_insert<" | head
  echo "## libstdc++ files the process maps after loading the extension"
  "$PY" -c "import torch, enginepy.delay_ops; print(open('/proc/self/maps').read())" | grep -o "/[^ ]*libstdc++[^ ]*" | sort -u
} >"$OUT/symbols.txt" 2>&1

if [ "$build_status" -ne 0 ]; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED (exit $build_status); logs in $OUT"
  exit "$build_status"
fi

# --------------------------------------------------------------------------------------- the test suite
# The files this run exists for go first, so they report even if the budget runs out in the rest.
first=(tests/test_build.py tests/test_delay_ops.py tests/test_numerics.py tests/test_fast.py)
rest=()
for path in tests/test_*.py tests/kernels; do
  case " ${first[*]} " in *" $path "*) ;; *) rest+=("$path") ;; esac
done
if [ -n "${TESTS:-}" ]; then
  read -r -a first <<<"$TESTS"
  rest=()
fi
options=(-p no:cacheprovider -q -rfEs --durations=25 --junitxml="$OUT/junit.xml")
"$PY" -c "import pytest_timeout" 2>/dev/null && options+=(--timeout=300)
if [ "$PYTEST_WORKERS" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
  # loadfile keeps each file in one worker, in the order given, with its module fixtures built once.
  options+=(-n "$PYTEST_WORKERS" --dist loadfile)
fi
# SIGINT first: pytest stops, prints its summary and writes junit.xml; SIGKILL 30 s later if it does not.
timeout -s INT -k 30 "$PYTEST_BUDGET_S" "$PY" -m pytest "${options[@]}" "${first[@]}" "${rest[@]}" \
  >"$OUT/pytest.log" 2>&1
pytest_status=$?

# ---------------------------------------------------------------------------------------------- summary
{
  echo "device: $(grep '^device' "$OUT/env.txt")"
  echo "build: ok (offline, $(grep -c -- ' -o ' "$OUT/build.log") compile/link lines in build.log)"
  head -3 "$OUT/symbols.txt"
  "$PY" - "$OUT/junit.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as exc:
    sys.exit(f"no junit report: {exc}")
for case in root.iter("testcase"):
    for prop in case.iter("property"):
        print(f"{case.get('name')}: {prop.get('name')} = {prop.get('value')}")
EOF
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -40
  tail -1 "$OUT/pytest.log"
  if [ "$pytest_status" -eq 124 ]; then
    echo "pytest was stopped at its ${PYTEST_BUDGET_S} s budget: pytest.log and junit.xml hold what ran"
  fi
} | tee "$OUT/summary.txt"
exit "$pytest_status"
