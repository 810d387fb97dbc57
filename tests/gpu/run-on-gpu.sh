#!/usr/bin/env bash
# Issue 7 in ONE run on a machine with an NVIDIA GPU: pytest tests/gpu -v, then the load benchmark.
#
# Two steps (see tests/gpu/README.md):
#   1. here, on a machine that reaches a package registry, once:
#          bash tests/gpu/run-on-gpu.sh --prepare
#      downloads the wheels the GPU image lacks (watchdog) into .whl/ and git-ignores it locally;
#   2. on the GPU machine (device tool), from the repo root:
#          run(command="bash tests/gpu/run-on-gpu.sh", carry=[".whl"], timeout_s=600)
#
# It uses the machine's own python that has a CUDA torch (no venv: a venv made from the image's
# venv python would not see its torch), installs only missing pure-python wheels into
# /tmp/devmapd-site (from .whl/, else the registry if one answers), and runs everything from the
# repo root with PYTHONPATH - nothing is built or installed into the image.
# Results go to $OUT (the device tool returns it; default ./gpu-results): run.log, env.txt,
# junit.xml, figures.jsonl, bench.json, daemon-logs.tgz. Whole run bounded to ~8.5 minutes;
# expected ~4-6 minutes on one H200.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
ROOT=$PWD
WHL=$ROOT/.whl
WATCHDOG_VERSION=${WATCHDOG_VERSION:-7.1.0}

if [ "${1:-}" = "--prepare" ]; then
    PY_HERE=${PYTHON:-}
    [ -z "$PY_HERE" ] && { [ -x .venv/bin/python ] && PY_HERE=.venv/bin/python || PY_HERE=python3; }
    mkdir -p "$WHL" .git/info
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # The GPU image's python is CPython 3.12 on x86-64 (KINDS.md); watchdog is pure python.
    "$PY_HERE" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHL" "watchdog==$WATCHDOG_VERSION" || exit 1
    ls -la "$WHL"
    echo "ready: run it on the GPU machine with carry=[\".whl\"]"
    exit 0
fi

OUT=${OUT:-$ROOT/gpu-results}
export OUT
mkdir -p "$OUT"
if [ -z "${_DEVMAPD_TEED:-}" ]; then   # run ourselves under tee, so run.log is complete when we return
    export _DEVMAPD_TEED=1
    bash "$0" "$@" 2>&1 | tee -a "$OUT/run.log"
    exit "${PIPESTATUS[0]}"
fi
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
echo "== devmapd issue 7 GPU run, $(date -u +%FT%TZ), repo $ROOT"

# ---- python with a CUDA torch ------------------------------------------------------------------
PY=""
for cand in "${PYTHON:-}" /opt/torch/.venv/bin/python3 python3 python; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || continue
    if "$cand" -c 'import torch' >/dev/null 2>&1; then PY=$(command -v "$cand"); break; fi
done
if [ -z "$PY" ]; then echo "FATAL: no python with torch found (set PYTHON=...)"; exit 3; fi
echo "python: $PY"

# ---- environment report ------------------------------------------------------------------------
{
    echo "date: $(date -u +%FT%TZ)"; uname -a; id
    echo "--- nvidia-smi"; (command -v nvidia-smi >/dev/null && nvidia-smi) || echo "no nvidia-smi"
    echo "--- nvidia-smi -L"; nvidia-smi -L 2>/dev/null || true
    echo "--- python/torch"
    "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}", p.name, p.total_memory >> 20, "MiB", "uuid str:", repr(str(p.uuid)))
try:
    import pynvml
    pynvml.nvmlInit()
    print("nvml driver", pynvml.nvmlSystemGetDriverVersion())
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        print(f"nvml {i}", pynvml.nvmlDeviceGetUUID(h), pynvml.nvmlDeviceGetPciInfo(h).busId)
except Exception as e:
    print("pynvml:", type(e).__name__, e)
EOF
    echo "--- env"; env | grep -E '^(CUDA_|PYTORCH_|NVIDIA_)' || true
    echo "--- /dev/shm, /tmp"; ls -ld /dev/shm /tmp; df -h /tmp /dev/shm 2>/dev/null
    echo "--- /dev/nvidia*"; ls -l /dev/nvidia* 2>/dev/null
    echo "--- setpriv"; command -v setpriv || echo "no setpriv"; getent group 65534 || echo "no group 65534"
} > "$OUT/env.txt" 2>&1
sed -n '/--- python\/torch/,/--- env/p' "$OUT/env.txt"
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "WARNING: torch sees no CUDA device here: every GPU test will SKIP and the bench will not run"
fi

# ---- dependencies: only what the image lacks, into /tmp/devmapd-site ----------------------------
SITE=/tmp/devmapd-site
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
missing() {
    "$PY" - <<'EOF'
import importlib.util
need = {"watchdog": "watchdog", "pynvml": "nvidia-ml-py", "safetensors": "safetensors", "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
}
MISSING=$(missing)
if [ -n "$MISSING" ]; then
    echo "missing python packages: $MISSING"
    if compgen -G "$WHL/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl
    fi
    MISSING=$(missing)
    if [ -n "$MISSING" ]; then   # a registry may answer on some machines; never wait long on it
        timeout 90 "$PY" -m pip install -q --no-deps --no-cache-dir --target "$SITE" $MISSING || true
        MISSING=$(missing)
    fi
    if [ -n "$MISSING" ]; then
        echo "FATAL: still missing $MISSING: run 'bash tests/gpu/run-on-gpu.sh --prepare' where pip works,"
        echo "       then run this with carry=[\".whl\"]"
        exit 3
    fi
fi
"$PY" -c 'import devmapd, watchdog, pynvml; print("devmapd", devmapd.__version__, "from", devmapd.__file__)' || exit 3

# ---- tests -------------------------------------------------------------------------------------
export PYTHONUNBUFFERED=1
export DEVMAPD_GPU_LOGS=$(mktemp -d /tmp/devmapd-gpu-logs.XXXXXX)
export DEVMAPD_GPU_FIGURES=$OUT/figures.jsonl
: > "$DEVMAPD_GPU_FIGURES"
TO=""
"$PY" -c 'import pytest_timeout' >/dev/null 2>&1 && TO="--timeout=240"
echo "== pytest tests/gpu ($(elapsed)s)"
timeout -k 10 360 "$PY" -m pytest tests/gpu -v -rA -p no:cacheprovider $TO --junitxml="$OUT/junit.xml"
PYTEST_RC=$?
echo "== pytest rc=$PYTEST_RC ($(elapsed)s)"

# ---- benchmark ---------------------------------------------------------------------------------
LEFT=$(( 500 - $(elapsed) ))
BENCH_RC=124
if [ "$LEFT" -gt 90 ]; then
    echo "== bench_gpu_load --gib ${BENCH_GIB:-4} (budget ${LEFT}s)"
    timeout -k 10 $(( LEFT - 10 )) "$PY" tests/gpu/bench_gpu_load.py --gib "${BENCH_GIB:-4}" --json "$OUT/bench.json"
    BENCH_RC=$?
else
    echo "== bench skipped: only ${LEFT}s left"
fi

tar czf "$OUT/daemon-logs.tgz" -C "$DEVMAPD_GPU_LOGS" . 2>/dev/null || true
echo "== figures"; cat "$DEVMAPD_GPU_FIGURES"
echo "== done: pytest rc=$PYTEST_RC bench rc=$BENCH_RC in $(elapsed)s; files in $OUT"
[ "$PYTEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
