#!/usr/bin/env bash
# The prepared GPU run, one command from a clean clone plus the wheels folder (`make gpu-wheels`, .whl/):
# installs the wheels without network into $SITE, then runs bench/gpu/run.py (every step, each under its
# own time limit, about 8 minutes in all on one H200). Results: $OUT (or bench/out/gpu)/results.{json,md}.
#   bash bench/gpu/run.sh [--budget SECONDS] [--steps NAME ...] [--dry-run]
set -uo pipefail
cd "$(dirname "$0")/../.."
# a folder named site-packages: datasets' fingerprints pickle modules by reference only from such a path (dill)
SITE=/tmp/tunesmith-gpu/site-packages
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --upgrade --target "$SITE" .whl/*.whl \
        || echo "warning: some wheels did not install; the steps that need them will say so"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
exec python3 bench/gpu/run.py --out "${OUT:-bench/out/gpu}" "$@"
