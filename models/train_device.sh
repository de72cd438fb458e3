#!/usr/bin/env bash
# Train the segmentation ResUNet on the lent GPU machine (16 cores, python3 with torch).
# Run from the repository root with the wheels in .whl (pydantic & co., see docs/segmentation.md)
# carried along; everything (weights, ONNX, logs, metrics) is written under $OUT.
#   TRAIN_SECONDS  wall-clock budget of the training loop (default 480)
#   TRAIN_ARGS     extra arguments for `perfline train`
#   SETTINGS       a complete TrainSettings JSON file (e.g. models/train_tight_fov.json): run
#                  `python -m perfline.models.train --settings` instead (TRAIN_SECONDS and
#                  TRAIN_ARGS are then ignored; relative model stems resolve from the repo root)
set -uo pipefail
OUT=${OUT:-/tmp/perfline_train_out}
mkdir -p "$OUT"
if ! python3 -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
# the import root `perfline` maps top-level folders (pyproject.toml); rebuild it with links
PKG=$(mktemp -d)
mkdir -p "$PKG/perfline"
for entry in perfline/*; do ln -s "$PWD/$entry" "$PKG/perfline/"; done
for folder in core gadgets server toolbox simulator models chains; do
    ln -s "$PWD/$folder" "$PKG/perfline/$folder"
done
ln -s "$PWD/models" "$PKG/models"  # relative stems such as models/resunet_perfusion
export PYTHONPATH="$PKG:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RUN="$OUT/run"  # written as training goes: survives a time-out (7 files in all come back)
mkdir -p "$RUN"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/device.txt"
WORKERS=${WORKERS:-$(( $(nproc) - 1 ))}
# run from the link tree: `python -m` puts the working directory first on sys.path, where the
# folder perfline/ alone would shadow the mapped package
if [ -n "${SETTINGS:-}" ]; then
    SETTINGS=$(realpath "$SETTINGS")
    (cd "$PKG" && OMP_NUM_THREADS=1 python3 -m perfline.models.train --settings "$SETTINGS" \
        --out "$RUN" --export-onnx --log-every 50) > "$OUT/train.log" 2>&1
    status=$?
    tail -n 30 "$OUT/train.log"
    exit "$status"
fi
(cd "$PKG" && python3 -m perfline.cli train --out "$RUN" --time-limit "${TRAIN_SECONDS:-480}" \
    --workers "$WORKERS" --export-onnx ${TRAIN_ARGS:-}) 2>&1 | tr '\r' '\n' \
    | grep -v '^ *[0-9]*%|' > "$OUT/train.log"
status=${PIPESTATUS[0]}
tail -n 30 "$OUT/train.log"
exit "$status"
