#!/usr/bin/env bash
# Runs on the lent GPU machine (see docs/DEVICE.md): the gpu-marked tests, then the demo.
# Usage there:  source .gpu/setup.sh && bash scripts/device_check.sh
# Logs go to $OUT (the device tool's return folder) when it is set, else to /tmp.
set -uo pipefail
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -m pytest -q -m gpu tests/ -p no:cacheprovider "$@" 2>&1 | tee "$out/gpu-tests.log" | tail -25
rc=${PIPESTATUS[0]}
python3 -m fa4_tq demo 2>&1 | tee "$out/demo.log"
exit $rc
