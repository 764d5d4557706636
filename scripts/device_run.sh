#!/usr/bin/env bash
# The one command a GPU machine runs: install the offline bundle (.whl/, from `make device-bundle`), run the
# device check, keep its JSON lines.
#
#   bash scripts/device_run.sh [OUTPUT_FOLDER]        # default: $OUT when set, else ./device-check-output
#
# Writes OUTPUT_FOLDER/device_check.jsonl (one JSON line per part, rewritten atomically after each part,
# so a run cut short keeps every finished part) and OUTPUT_FOLDER/device_check.log (pytest's and the parts'
# output). Needs no network: the bundle is installed with pip --no-index into a --target folder (only
# what the interpreter lacks). Environment: PYTHON (default python3, the image's interpreter);
# DEVICE_CHECK_ARGS (extra arguments, e.g. "--parts environment resume" or "--device cpu --quick");
# DEVICE_BUNDLE (the wheels, default .whl); DEVICE_SITE (where they go, default $TMPDIR/knn-cm-device-site).
# Exit status: the check's (0 all parts ok, 1 a part failed or was cut, 2 no CUDA, 128 + N when stopped by
# signal N).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${1:-${OUT:-device-check-output}}"
python="${PYTHON:-python3}"
site="${DEVICE_SITE:-${TMPDIR:-/tmp}/knn-cm-device-site}"
wheels="${DEVICE_BUNDLE:-.whl}"
mkdir -p "$out" || exit 1
bundle=()
if compgen -G "$wheels/*.whl" > /dev/null; then
    bundle=(--bundle "$wheels" --site "$site")
else
    echo "device_run: no wheels in $wheels (make device-bundle where PyPI is reachable); using what is installed" >&2
fi
export PYTHONUNBUFFERED=1
# shellcheck disable=SC2086  # DEVICE_CHECK_ARGS is a list of words on purpose
"$python" scripts/device_check.py "${bundle[@]}" --jsonl "$out/device_check.jsonl" ${DEVICE_CHECK_ARGS:-} \
    2> >(tee "$out/device_check.log" >&2)
status=$?
wait  # the tee of the log
echo "device_run: JSON lines in $out/device_check.jsonl, log in $out/device_check.log (status $status)" >&2
exit $status
