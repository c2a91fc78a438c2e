# Sourced by the device scripts (gpu_check.sh, ab_env.sh): install the carried wheels (zstandard, gguf,
# platformdirs are not in the device image) into /tmp/site, put them and the repo on PYTHONPATH, make $OUT.
# $1: the calling script's name, for the error line.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "$1: could not install .whl/*.whl (carry .whl)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/qrun-out}
mkdir -p "$OUT"
