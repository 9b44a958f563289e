#!/usr/bin/env bash
# `make demo`: three real jobs through the real CLI with the sample gpurun.yaml.
# Two run at once on disjoint GPUs and CPUs; the third waits for them.
set -euo pipefail
cd "$(dirname "$0")/.."
GPURUN="${GPURUN:-.venv/bin/gpurun}"
PY="${PY:-.venv/bin/python}"
export GPURUN_CONFIG="$PWD/gpurun.yaml"
# A private state dir, so the demo never touches this host's real ledger.
GPURUN_STATE_DIR="$(mktemp -d /tmp/gpurun-demo.XXXXXX)"
export GPURUN_STATE_DIR
trap 'rm -rf "$GPURUN_STATE_DIR"' EXIT

echo "== two jobs with 2 GPUs and 1 CPU each, started together"
"$GPURUN" -g 2 -c 1 -n first -- "$PY" examples/work.py first 4 &
"$GPURUN" -g 2 -c 1 -n second -- "$PY" examples/work.py second 4 &
until [ "$("$GPURUN" ps | grep -c running)" -ge 2 ]; do sleep 0.1; done
echo "== a third job asking for 1 GPU must wait for them"
"$GPURUN" -g 1 -c 1 -n third -- "$PY" examples/work.py third 1 &
sleep 0.5
echo "== gpurun ps while they run"
"$GPURUN" ps
echo "== gpurun status --detail"
"$GPURUN" status --detail
wait
echo "== gpurun ps -a at the end"
"$GPURUN" ps -a
