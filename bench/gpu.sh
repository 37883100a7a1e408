#!/usr/bin/env bash
# The one-shot GPU check, for a machine with an NVIDIA GPU and no network (at most 8 minutes on an H200):
# the tests marked cuda, then bench/gpu.py (ceilings, training MFU of the 125m and 1b presets, 1b decode against
# the bandwidth bound, eval bpb and generate on a 1b checkpoint). Writes OUT/gpu.json and OUT/gpu.md.
#
#   bench/gpu.sh pack        # here, with network and `make setup` done: wheels into .whl/, the shared data into .gpu-data/
#   bench/gpu.sh [OUT]       # there, in a copy of the working tree with .whl/ and .gpu-data/ (OUT default work/gpu)
#
# That machine's python3 (3.12) is expected to hold torch (CUDA), numpy, pyarrow, tokenizers, safetensors, tqdm,
# transformers, scikit-learn, scipy, matplotlib, pytest and hypothesis; what else tweetlm imports travels as
# wheels (manylinux x86-64, CPython 3.12), installed with pip --no-index --no-deps into /tmp/tweetlm-site.
set -uo pipefail
cd "$(dirname "$0")/.."

# tweetlm's imports that the GPU image lacks, at the versions `make setup` installed (.venv)
WHEELS="py3langid datasketch zstandard tomli_w fastapi starlette pydantic pydantic_core annotated-types typing-inspection uvicorn"

if [ "${1:-}" = pack ]; then
    rm -rf .whl && mkdir .whl
    pins=$(.venv/bin/python -m pip freeze | grep -iE "^($(echo $WHEELS | tr ' ' '|'))==") || { echo "run make setup first" >&2; exit 2; }
    # shellcheck disable=SC2086
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl $pins || exit 1
    rm -rf .gpu-data && cp -r "${TWEETLM_DATA:-../shared/data}" .gpu-data
    echo "packed: $(ls .whl | wc -l) wheels ($(du -sh .whl | cut -f1)), data $(du -sh .gpu-data | cut -f1)"
    exit 0
fi

out=${1:-work/gpu}
mkdir -p "$out"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tweetlm-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/tweetlm-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .gpu-data ]; then export TWEETLM_DATA=${TWEETLM_DATA:-$PWD/.gpu-data}; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader

start=$SECONDS
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device.py 2>&1 | tee "$out/cuda-tests.log"
summary="$(grep -E '(passed|failed|error)' "$out/cuda-tests.log" | tail -n 1 | tr -d '=') ($((SECONDS - start)) s)"
timeout 420 $PY bench/gpu.py --out "$out" --cuda-tests "$summary" "${@:2}"
echo "bench/gpu.sh: $((SECONDS - start)) s in all"
