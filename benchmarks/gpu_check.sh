#!/usr/bin/env bash
# The GPU check, for a CUDA machine with PyTorch and Triton installed (no network needed):
#
#   bash benchmarks/gpu_check.sh          (from anywhere; PYTHON=... picks the interpreter, default python)
#
# Parts, each under its own wall-clock cap (all together under 5.5 minutes; a part that fails or
# runs past its cap is recorded and the next one runs):
#   env        python / torch / triton / GPU versions, and the modules fastff needs that are missing
#   install    pip install --no-deps --no-build-isolation -e .   (the tree is also put on PYTHONPATH)
#   tests      pytest -m cuda: Triton vs torch backend on the GPU (eval, gradients, float32 / bfloat16)
#   gpu_check  benchmarks/gpu_check.py: Triton vs cuBLAS dense vs the torch backend, eval and training
#   lm_bench   fastff lm bench --device cuda at the GPT-2-small shape (12 layers, dim 768, tree 1x11)
# Output: $OUT if set, else benchmarks/results/gpu/: status.txt (part, exit status, seconds), each
# part's output in NAME.log, the results in gpu_check.json, gpu_check.txt (its tables) and
# lm_bench.txt; the summary is printed at the end. Exit status 1 if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DIR=${OUT:-benchmarks/results/gpu}
mkdir -p "$DIR"
rm -f "$DIR"/{status.txt,env.log,install.log,tests.log} \
      "$DIR"/{gpu_check.log,gpu_check.json,gpu_check.txt,lm_bench.log,lm_bench.txt}    # a previous run's
export PY DIR PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: >"$DIR/status.txt"
failed=0

# part NAME CAP_SECONDS COMMAND...: runs COMMAND for at most CAP_SECONDS, its output in $DIR/NAME.log
part() {
    local name=$1 cap=$2 start rc status
    shift 2
    echo "== $name (cap ${cap}s)" >&2
    start=$(date +%s)
    timeout -k 5 "$cap" "$@" >"$DIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMED OUT after ${cap}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [ "$rc" = 0 ] || failed=1
    printf '%-10s %-26s %4ss\n' "$name" "$status" "$(( $(date +%s) - start ))" | tee -a "$DIR/status.txt" >&2
}

env_report() {
    date -u; uname -a
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi: not found"
    "$PY" - <<'EOF'
import importlib.util, sys
print("python", sys.version.split()[0], sys.executable)
need = ["torch", "triton", "numpy", "numba", "tqdm", "threadpoolctl", "safetensors", "pytest", "hypothesis"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      *(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
if importlib.util.find_spec("triton"):
    import triton
    print("triton", triton.__version__)
print("missing modules:", ", ".join(missing) or "none")
sys.exit(1 if missing or not torch.cuda.is_available() else 0)
EOF
}
export -f env_report

part env 20 bash -c env_report
part install 30 "$PY" -m pip install --no-deps --no-build-isolation --no-input -e .
# (without the interpreter tests: collecting them turns Triton's interpreter on for the whole process)
part tests 80 "$PY" -m pytest -q -m cuda -p no:cacheprovider --ignore-glob='tests/test_kernels_triton*' tests
part gpu_check 120 bash -c '"$PY" benchmarks/gpu_check.py --device cuda --out "$DIR" >/dev/null'
part lm_bench 60 bash -c '"$PY" -m fastff.apps.cli lm bench --device cuda --repeats 3 \
    --ffns dense,neuron-tree,fff,moe,no-ffn >"$DIR/lm_bench.txt"'

{
    echo "# GPU check summary ($DIR)"
    cat "$DIR/status.txt"
    echo; tail -n 4 "$DIR/env.log"
    echo; tail -n 3 "$DIR/tests.log"
    for f in gpu_check lm_bench; do
        echo
        if [ -s "$DIR/$f.txt" ]; then cat "$DIR/$f.txt"
        else echo "$f: no results, see $DIR/$f.log:"; tail -n 3 "$DIR/$f.log"; fi
    done
} >&2
exit $failed
