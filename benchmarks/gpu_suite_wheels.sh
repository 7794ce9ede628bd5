#!/usr/bin/env bash
# Prepare, on a machine that reaches PyPI, the packages a bare GPU machine (no registry) needs for
# benchmarks/gpu_suite.sh. Usage (from the repository root):
#
#     bash benchmarks/gpu_suite_wheels.sh [DIR]          # default DIR: .gpu-wheels (ignored by git)
#
# Writes (for CPython 3.12 on x86-64 Linux, the GPU image's python3):
#   DIR/base/   small wheels + a trimmed llama-cpp-python sdist (~20 MB): carry this in the first call
#               gguf, diskcache (llama-cpp-python's runtime dependency), gptqmodel (built here: a pure
#               Python wheel) and the dependencies the GPU image lacks (device-smi, pypcre, tokenicer,
#               logbar, defuser, datasets, dill, multiprocess, torchao; sdist-only ones built here with
#               a CPython 3.12, pypcre links the system's libpcre2-8.so.0), and
#               llama_cpp_python-VERSION-trimmed.tar.gz: the sdist without vendor/llama.cpp's models,
#               docs, tests, examples and .git folders (77 MB -> ~8 MB); built there for the GPU's arch.
#   DIR/ort-N/  onnxruntime-gpu (CUDA 13 build, ~256 MB) cut into parts of PART_MIB (default 44) MiB,
#               one folder per call: a call carries at most 64 MiB INCLUDING the repository's own
#               files (~17 MB), so each part travels in its own call with
#               `gpu_suite.sh --wheels DIR/ort-N --stage-only` (parts are joined, checked against the
#               recorded sha256, once all have arrived).
# Versions follow .ci/constraints.txt where it pins them.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.gpu-wheels}"
PY_TAGS=(--python-version 3.12 --implementation cp --abi cp312
         --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
         --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
pin() { grep -E "^$1==" .ci/constraints.txt | head -1 | cut -d= -f3; }
LLAMA_VERSION="$(pin llama-cpp-python)"
ORT_VERSION="$(pin onnxruntime-gpu)"
GPTQ_VERSION="$(pin gptqmodel)"
mkdir -p "$DIR/base"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "binary wheels -> $DIR/base"
python3 -m pip download -q --no-deps --only-binary=:all: "${PY_TAGS[@]}" -d "$DIR/base" \
    "gguf==$(pin gguf)" diskcache==5.6.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 torchao==0.18.0

# Packages published only as sdists (pypcre has a C extension) are built here by a CPython 3.12
# (PY312, default: pyenv's 3.12, else python3.12): their wheels must match the GPU image's python3.
PY312="${PY312:-$(ls "$HOME"/.pyenv/versions/3.12*/bin/python 2>/dev/null | head -1)}"
PY312="${PY312:-$(command -v python3.12 || true)}"
[ -n "$PY312" ] || { echo "no CPython 3.12 found: set PY312=/path/to/python3.12" >&2; exit 1; }
echo "wheels built with $PY312: gptqmodel $GPTQ_VERSION, pypcre, device-smi, defuser, logbar, tokenicer"
"$PY312" -m pip wheel -q --no-deps -w "$DIR/base" "gptqmodel==$GPTQ_VERSION" pypcre==0.6.4 \
    device-smi==0.5.7 defuser==0.0.28 logbar==0.4.15 tokenicer==0.0.14

echo "llama-cpp-python $LLAMA_VERSION: trimmed sdist"
python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$LLAMA_VERSION"
tar xzf "$tmp/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$tmp"
src="$tmp/llama_cpp_python-$LLAMA_VERSION"
V="$src/vendor/llama.cpp"
rm -rf "$src/.git" "$src/docs" "$src/docker" "$src/examples" "$src/tests" "$src/.github" \
    "$V/models" "$V/docs" "$V/media" "$V/benches" "$V/tests" "$V/.github" "$V/app" "$V/gguf-py" \
    "$V/conversion" "$V/examples" "$V/.devops" "$V/pocs" "$V/grammars"
for tool in "$V"/tools/*; do  # llama-cpp-python builds only tools/mtmd
    [ "$(basename "$tool")" = mtmd ] || rm -rf "$tool"
done
tar czf "$DIR/base/llama_cpp_python-$LLAMA_VERSION-trimmed.tar.gz" -C "$tmp" "llama_cpp_python-$LLAMA_VERSION"

PART_MIB="${PART_MIB:-44}"
echo "onnxruntime-gpu $ORT_VERSION: split into parts of $PART_MIB MiB"
python3 -m pip download -q --no-deps --only-binary=:all: "${PY_TAGS[@]}" -d "$tmp/ort" "onnxruntime-gpu==$ORT_VERSION"
wheel="$(ls "$tmp"/ort/onnxruntime_gpu-*.whl)"
name="$(basename "$wheel")"
rm -rf "$DIR"/ort-*
split -b "${PART_MIB}m" -d -a 2 "$wheel" "$tmp/ort/$name.part-"
parts=("$tmp"/ort/"$name".part-*)
i=0
for part in "${parts[@]}"; do
    i=$((i + 1))
    mkdir -p "$DIR/ort-$i"
    mv "$part" "$DIR/ort-$i/"
    # Every folder says what the whole wheel is, so whichever call completes the set can join it.
    printf '%s %s %s\n' "$(sha256sum "$wheel" | cut -d' ' -f1)" "${#parts[@]}" "$name" >"$DIR/ort-$i/$name.parts"
done

du -sh "$DIR"/* | sed 's/^/  /'
echo "carry $DIR/base in the first call and each $DIR/ort-N in one call each (benchmarks/RESULTS.md, GPU suite)"
