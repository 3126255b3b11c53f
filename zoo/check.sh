#!/usr/bin/env bash
# Check this bundle as the MONAI Model Zoo's CI checks a pull request that adds it, offline:
#   bash zoo/check.sh [PATH/model-zoo.tar.gz] [PATH/meta_schema.json]     (defaults: ../shared/zoo/)
# Unpacks the Zoo snapshot in a temporary folder, copies the bundle to models/mednist_classification and this
# folder's Zoo unit test to ci/unit_tests/, then from the Zoo's root: isort, black and flake8 with the Zoo's
# settings and plugins; verify_metadata against the schema; the pins ci/get_bundle_requirements.py derives from
# metadata.json, resolved for Python 3.10, 3.11 and 3.12 (needs the package index); ci/verify_bundle.py in min
# mode, with the schema and the weights download stood in by local files; ci/unit_tests/runner.py.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
tarball=$(realpath "${1:-$repo/../shared/zoo/model-zoo.tar.gz}")
schema=$(realpath "${2:-$repo/../shared/zoo/meta_schema_20240725.json}")
name=mednist_classification
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar xzf "$tarball" -C "$work"
cd "$work/model-zoo"
bundle=models/$name
mkdir -p "$bundle"
cp -r "$repo/configs" "$repo/docs" "$repo/scripts" "$repo/LICENSE" "$repo/large_files.yml" "$bundle/"
find "$bundle" -name __pycache__ -prune -exec rm -rf {} +
cp "$repo/zoo/test_$name.py" ci/unit_tests/
changed=("$bundle" "ci/unit_tests/test_$name.py")

echo "== format (isort, black, flake8 with the Zoo's setup.cfg and pyproject.toml)"
isort --check-only --diff --settings-path setup.cfg "${changed[@]}"
black --check --config pyproject.toml "${changed[@]}"
flake8 --config setup.cfg "${changed[@]}"

echo "== metadata against the schema"
python -m monai.bundle verify_metadata --meta_file "$bundle/configs/metadata.json" --filepath "$schema"

echo "== pinned requirements on Python 3.10, 3.11, 3.12"
requirements=ci/$(cd ci && python get_bundle_requirements.py --b "$name" --p ../models)
# each pin as a binary wheel for that Python; then, with their dependencies, the pins that do not need torch
# (torch's CUDA dependencies, and so monai's and ignite's, come from an index this check may not reach)
grep -v -E '^(torch|monai|pytorch-ignite)==' "$requirements" > "$work/without-torch.txt"
for version in 3.10 3.11 3.12; do
    target=(--dry-run --quiet --ignore-installed --only-binary=:all: --python-version "$version"
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    python -m pip install "${target[@]}" --no-deps -r "$requirements"
    python -m pip install "${target[@]}" -r "$work/without-torch.txt"
    echo "Python $version: $(tr '\n' ' ' < "$requirements")install"
done

echo "== ci/verify_bundle.py, min mode"
mkdir -p "$bundle/eval" && cp "$schema" "$bundle/eval/schema.json"  # what ci/prepare_schema.py downloads
[ -f models/model_info.json ] || echo '{}' > models/model_info.json  # no published version of this bundle yet
python - "$bundle" <<'PY'
import hashlib, json, os, sys, numpy as np, torch, yaml
from monai.bundle import ConfigParser
bundle = sys.argv[1]
sys.path.insert(0, bundle)  # its scripts, as the workflow's initialize step puts them on the path
parser = ConfigParser()
parser.read_config(os.path.join(bundle, "configs", "inference.json"))
parser.read_meta(os.path.join(bundle, "configs", "metadata.json"))
with open(os.path.join(bundle, "large_files.yml")) as f:
    large = yaml.safe_load(f)
for entry in large["large_files"]:  # each published file stood in by a local one of the same kind
    name = os.path.basename(entry["path"])
    stand_in = os.path.abspath(os.path.join(bundle, "..", "stand-in-" + name))
    if name.endswith(".pt"):
        torch.save(parser.get_parsed_content("network_def").state_dict(), stand_in)
    elif name.endswith(".json"):
        with open(stand_in, "w") as f:
            json.dump({"temperature": 1.0}, f)  # no thresholds: calibration that changes nothing
    else:
        np.savez(stand_in, means=np.zeros((6, 1), np.float32), precision=np.ones((1, 1), np.float32))
    entry.update(url="file://" + stand_in, hash_val=hashlib.sha256(open(stand_in, "rb").read()).hexdigest())
with open(os.path.join(bundle, "large_files.yml"), "w") as f:
    yaml.safe_dump(large, f)
PY
python ci/verify_bundle.py -b "$name" -m min
rm -rf "$bundle/models" "$bundle/eval"

echo "== ci/unit_tests/runner.py"
python ci/unit_tests/runner.py --b "$name"
echo "Model Zoo checks passed"
