#!/usr/bin/env bash
# GPU check, for a lent CUDA machine without network (about 3 to 5 minutes on an H100):
#
#     bash tools/gpu_check.sh WHEELS_DIR MEDNIST_TARBALL [SEEDS]
#
# WHEELS_DIR holds the wheels a torch-with-CUDA machine may lack (../shared/gpu/wheels: monai, pytorch-ignite,
# nibabel, fire, termcolor); they are installed with their bytecode compiled, as pip normally does, into a scratch
# folder put on PYTHONPATH. MEDNIST_TARBALL (../shared/data/MedNIST-dev.tar.gz) is unpacked beside it. Then it
# prints the device (scripts.check_gpu) and runs tools.time_to_accuracy with the defaults, target 0.995, once per
# seed in SEEDS (default "0"): whole-command split (before, during and after training), images/s, time
# to 99.5% and test accuracy. Run from the repository root; nothing is written outside the scratch folder.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: bash tools/gpu_check.sh WHEELS_DIR MEDNIST_TARBALL [SEEDS]" >&2; exit 2; }
wheels=$(cd "$1" && pwd)
tarball=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
seeds=${3:-0}
ls "$wheels"/*.whl > /dev/null || { echo "ERROR: no .whl files in $wheels" >&2; exit 2; }
[ -f "$tarball" ] || { echo "ERROR: $tarball is not a file" >&2; exit 2; }
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/mednist-gpu-check-XXXXXX")
trap 'rm -rf "$work"' EXIT

start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --target "$work/site" "$wheels"/*.whl
export PYTHONPATH="$work/site"
mkdir -p "$work/data" && tar -xzf "$tarball" -C "$work/data"
echo "installed the wheels and unpacked the data in $(( $(date +%s) - start )) s"
python3 -m scripts.check_gpu --require_gpu true
for seed in $seeds; do
    echo "== time to accuracy, defaults, seed $seed"
    python3 -m tools.time_to_accuracy --dataset_dir "$work/data" --work_dir "$work/tta-$seed" --target 0.995 \
        --seed "$seed"
done
