#!/usr/bin/env bash
# `make sanitize`: the C++ extension built with AddressSanitizer and UndefinedBehaviorSanitizer
# (-O1, frame pointers, no Release) in build/sanitize, then the native tests and the native
# fuzz tests run against that build. Any sanitizer report aborts the run (exit != 0).
#
# The normal build and the dev venv's editable install are left alone: the sanitized package
# (the sources plus the sanitized _native) lives in build/sanitize/site, and runs in its own
# venv that sees the dev venv's packages through a plain path entry (.pth). Such an entry does
# not run the dev venv's own .pth hooks, so the editable install's import redirect, which
# would load the normal _native, is not installed there.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY="$PWD/$VENV/bin/python"
SAN="$PWD/build/sanitize"
FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -O1 -g"

CMAKE=$(command -v cmake || true)
if [ -z "$CMAKE" ]; then
  flock build.lock "$VENV/bin/pip" install -q cmake ninja
  CMAKE="$PWD/$VENV/bin/cmake"
fi
GENERATOR=()
if command -v ninja >/dev/null || [ -x "$VENV/bin/ninja" ]; then GENERATOR=(-G Ninja); fi
if [ -f "$SAN/cmake/CMakeCache.txt" ] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${GENERATOR[1]:-Unix Makefiles}" "$SAN/cmake/CMakeCache.txt"; then
  rm -rf "$SAN/cmake"  # configured with another generator: start over
fi

# The version scikit-build-core would pass: the installed package's metadata (pyproject.toml).
VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("attention-service"))')

"$CMAKE" -S native -B "$SAN/cmake" "${GENERATOR[@]}" \
  -DCMAKE_BUILD_TYPE=Debug \
  -DSKBUILD_PROJECT_NAME=attention_service \
  -DSKBUILD_PROJECT_VERSION="$VERSION" \
  -DCMAKE_CXX_FLAGS="$FLAGS" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
  -DPython_EXECUTABLE="$PY" >/dev/null
"$CMAKE" --build "$SAN/cmake" -j "$(nproc)"

if [ ! -x "$SAN/venv/bin/python" ]; then
  "$PY" -m venv --without-pip "$SAN/venv"
fi
SAN_PY="$SAN/venv/bin/python"
dev_site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
san_site=$("$SAN_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$dev_site" >"$san_site/dev-venv.pth"

# The tests are copied beside the sanitized package: pytest puts the directory holding the
# `tests` package first on sys.path, and there `service` is the sanitized copy.
rm -rf "$SAN/site"
mkdir -p "$SAN/site"
cp -r service tests "$SAN/site/"
find "$SAN/site/service" -name '_native*.so' -delete
cp "$SAN"/cmake/_native*.so "$SAN/site/service/"

export PYTHONPATH="$SAN/site"
# Never the working directory first on sys.path: its service/ would shadow the sanitized one.
export PYTHONSAFEPATH=1
# The ASan runtime must come first; libstdc++ right after it, so that ASan's __cxa_throw
# interceptor finds the real one (python does not link libstdc++: without it, any C++ throw
# aborts with "CHECK failed: real___cxa_throw != 0").
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(g++ -print-file-name=libstdc++.so.6)"
export LD_PRELOAD
# Python itself keeps memory until exit by design: leak reports would be noise. An allocation
# beyond ASan's maximum (the fuzzers' absurd claimed shapes) must fail as malloc does, with
# NULL (numpy's MemoryError), not abort.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:print_summary=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"

# The sanitized module must be the one imported, and really be instrumented.
"$SAN_PY" - "$SAN/site" <<'EOF'
import sys

from service import _native

assert _native.__file__.startswith(sys.argv[1]), f"wrong _native: {_native.__file__}"
maps = open("/proc/self/maps").read()
assert "libasan" in maps and "libubsan" in maps, "the sanitizer runtimes are not loaded"
print(f"sanitized build: {_native.__file__} (ISAs: {', '.join(_native.available_isas())})")
EOF

start=$(date +%s)
# --capture=sys: a sanitizer writes its report to file descriptor 2 and then kills the
# process, so pytest must not be holding fd 2 in a temporary file that dies with it.
(cd "$SAN/site" && "$SAN_PY" -m pytest -q -p no:cacheprovider --capture=sys \
  tests/native/test_kernels.py tests/native/test_mask_plan.py tests/native/test_fuzz.py \
  tests/native/test_fuzz_mask_plan.py "$@")
echo "sanitize: ASan + UBSan clean in $(($(date +%s) - start)) s"
