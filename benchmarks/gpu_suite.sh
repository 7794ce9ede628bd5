#!/usr/bin/env bash
# The GPU suite on a bare GPU machine that reaches no package registry (run from the repository root):
#
#     bash benchmarks/gpu_suite.sh --wheels DIR [--out OUTDIR] [--budget-s 570] [--stage-only] [-- SUITE ARGS]
#
# DIR is a folder prepared by benchmarks/gpu_suite_wheels.sh and carried along. The script
#  1. stages DIR's files into .gpu-suite/wheels (kept on the machine between calls while it stays warm),
#     joining split wheels (onnxruntime-gpu) once all their parts have arrived; --stage-only stops here
#     (for the calls that only carry parts);
#  2. installs into .gpu-suite/site (put first on PYTHONPATH; the image's python3 and its torch,
#     transformers, onnx, safetensors, ... are used as they are), timing each step:
#       small wheels (gguf, diskcache), onnxruntime-gpu (replaces the image's CPU onnxruntime on
#       sys.path), GPTQModel + its missing dependencies, this project, and llama-cpp-python built
#       from the trimmed sdist with CUDA for this GPU's architecture only (CMAKE_CUDA_ARCHITECTURES
#       from nvidia-smi, all cores; extra flags in GPU_SUITE_CMAKE_ARGS) IN THE BACKGROUND while the
#       suite's synth step does its llama.cpp-free work; the wheel is cached in .gpu-suite/wheelhouse
#       for the next call on the same machine;
#  3. runs benchmarks/gpu_suite.py with the install timings (--install-log) and what is left of the
#     budget, writing the table and JSON line to OUTDIR (default: $OUT when set, else .gpu-suite/out).
# A failing install is recorded (the steps that need it then fail on their own) and the run goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
WHEELS="" OUTDIR="${OUT:-.gpu-suite/out}" BUDGET=570 STAGE_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --out) OUTDIR="$2"; shift 2 ;;
        --budget-s) BUDGET="$2"; shift 2 ;;
        --stage-only) STAGE_ONLY=1; shift ;;
        --) shift; break ;;
        *) echo "gpu_suite.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
STATE=.gpu-suite
mkdir -p "$STATE/wheels" "$STATE/site" "$STATE/wheelhouse" "$OUTDIR"
LOG="$STATE/install.jsonl"
: >"$LOG"

record() {  # record STEP SECONDS OK NOTE
    printf '{"step": "%s", "seconds": %s, "ok": %s, "note": "%s"}\n' "$1" "$2" "$3" "${4//\"/\'}" >>"$LOG"
    echo "install $1: $([ "$3" = true ] && echo ok || echo FAILED) in $2 s ${4:+($4)}" >&2
}

timed() {  # timed STEP NOTE CMD... : runs CMD, records its time and outcome
    local step="$1" note="$2" t0 rc
    shift 2
    t0=$(date +%s%N)
    "$@" >"$STATE/install-$step.log" 2>&1
    rc=$?
    local dt
    dt=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
    if [ $rc -eq 0 ]; then record "$step" "$dt" true "$note"; else
        record "$step" "$dt" false "$(tail -1 "$STATE/install-$step.log" | cut -c1-200)"; fi
    return $rc
}

# ----- 1. stage (and join split wheels) ---------------------------------------------------------------
if [ -n "$WHEELS" ]; then
    cp -r "$WHEELS"/. "$STATE/wheels/"
fi
for manifest in "$STATE"/wheels/*.parts; do
    [ -e "$manifest" ] || continue
    read -r sha count name <"$manifest"
    [ -f "$STATE/wheels/$name" ] && continue
    have=$(ls "$STATE/wheels/$name".part-* 2>/dev/null | wc -l)
    if [ "$have" -lt "$count" ]; then echo "staged $have of $count parts of $name" >&2; continue; fi
    cat "$STATE/wheels/$name".part-* >"$STATE/wheels/$name.tmp"
    if [ "$(sha256sum "$STATE/wheels/$name.tmp" | cut -d' ' -f1)" = "$sha" ]; then
        mv "$STATE/wheels/$name.tmp" "$STATE/wheels/$name" && rm -f "$STATE/wheels/$name".part-*
        echo "joined $name" >&2
    else
        rm -f "$STATE/wheels/$name.tmp"; echo "parts of $name do not match the recorded sha256" >&2
    fi
done
if [ "$STAGE_ONLY" = 1 ]; then ls -la "$STATE/wheels" >&2; exit 0; fi

# ----- 2. installs ---------------------------------------------------------------------------------------
SITE="$(cd "$STATE/site" && pwd)"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
PIP=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
W="$STATE/wheels"
small=$(ls "$W"/gguf-*.whl "$W"/diskcache-*.whl 2>/dev/null)
[ -n "$small" ] && timed small-wheels "gguf, diskcache" "${PIP[@]}" $small
ort=$(ls "$W"/onnxruntime_gpu-*.whl 2>/dev/null)
if [ -n "$ort" ]; then timed onnxruntime-gpu "$(basename "$ort")" "${PIP[@]}" "$ort"
else record onnxruntime-gpu 0 false "not staged: carry every $W/ort-N part (gpu_suite_wheels.sh)"; fi
gptq=$(ls "$W"/*.whl 2>/dev/null | grep -Ev '/(gguf|diskcache|onnxruntime_gpu|llama_cpp_python)-')
[ -n "$gptq" ] && timed gptqmodel "gptqmodel + its missing dependencies" "${PIP[@]}" $gptq

timed minigpt4-local "this checkout" "${PIP[@]}" --no-build-isolation .

# llama-cpp-python: built in the background (the longest install); the suite's synth step does its
# llama.cpp-free work (sources, convert, ONNX export) meanwhile and waits for this marker file only
# before the GGUF quantizer, as do the steps that run llama.cpp.
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
arch="${arch:-90}"
READY="$PWD/$STATE/llama.done"
rm -f "$READY"
export GPU_SUITE_LLAMA_READY="$READY"
llama_install() {
    # A CUDA wheel built earlier on this machine (wheelhouse), or one carried in DIR, skips the build.
    local built sdist
    built=$(ls "$STATE"/wheelhouse/llama_cpp_python-*.whl "$W"/llama_cpp_python-*.whl 2>/dev/null | head -1)
    sdist=$(ls "$W"/llama_cpp_python-*-trimmed.tar.gz 2>/dev/null | head -1)
    if [ -z "$built" ] && [ -n "$sdist" ]; then
        CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DGGML_NATIVE=on ${GPU_SUITE_CMAKE_ARGS:-}" \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
            timed llama-cpp-python-build "CUDA sm_$arch, -j $(nproc)" \
            "$PY" -m pip wheel -q --no-index --no-deps --no-build-isolation -w "$STATE/wheelhouse" "$sdist"
        built=$(ls "$STATE"/wheelhouse/llama_cpp_python-*.whl 2>/dev/null | head -1)
    fi
    if [ -n "$built" ] && timed llama-cpp-python "$(basename "$built")" "${PIP[@]}" "$built"; then
        echo ok >"$READY"
    else
        [ -n "$built" ] || record llama-cpp-python 0 false "no wheel and no trimmed sdist staged"
        echo failed >"$READY"
    fi
}
llama_install &

# onnxruntime-gpu loads cuBLAS/cuDNN/cuRAND from the image's nvidia-* wheels.
nvlibs=$("$PY" - <<'EOF'
import site, pathlib
dirs = []
for root in site.getsitepackages():
    dirs += sorted(str(p) for p in pathlib.Path(root).glob("nvidia/**/lib") if p.is_dir())
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="${nvlibs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export GPTQMODEL_TORCH_EXTENSIONS_DIR="$PWD/$STATE/torch_extensions"  # kernel JIT cache, kept while warm

# ----- 3. the suite -------------------------------------------------------------------------------------
left=$((BUDGET - ($(date +%s) - start)))
[ "$left" -ge 1 ] || left=1  # 0 would mean "no budget" to the suite
echo "installs took $(( $(date +%s) - start )) s; suite budget ${left} s" >&2
PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_suite.py --install-log "$LOG" --budget-s "$left" --out "$OUTDIR" "$@"
status=$?
wait  # the background build, if the suite ended before it
exit $status
