#!/usr/bin/env bash
# Wheels of the project's requirements that a GPU image with torch, numpy, pandas, pyarrow, seaborn,
# joblib, rich and tokenizers lacks (pydantic, optuna and what they need), for CPython 3.12 on x86-64
# Linux, into DIR (default .whl, git-ignored):
#   scripts/device-wheels.sh [DIR]   then on the node: scripts/device-check.sh DIR
# pip resolves them together (pydantic pins its pydantic-core exactly), at the versions this Python has
# installed where it has them (so the node runs what the tests here ran); wheels of packages such an image
# already has are left out, so they do not shadow its own.
set -euo pipefail
DIR=${1:-.whl}
mkdir -p "$DIR"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
python3 -m pip freeze 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==' >"$constraints" || true
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -c "$constraints" -d "$DIR" pydantic optuna
for have in numpy packaging pyyaml PyYAML tqdm markupsafe MarkupSafe; do
    rm -f "$DIR"/"$have"-*.whl
done
ls "$DIR"
