#!/usr/bin/env bash
# Wheels of the project's requirements that a GPU image with torch, numpy, pandas, pyarrow, seaborn
# and joblib lacks, for CPython 3.12 on x86-64 Linux, into DIR (default .whl, git-ignored):
#   scripts/device-wheels.sh [DIR]   then on the node: scripts/device-check.sh DIR
set -euo pipefail
DIR=${1:-.whl}
mkdir -p "$DIR"
for pkg in pydantic pydantic-core annotated-types typing-inspection optuna alembic sqlalchemy mako colorlog \
           greenlet; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DIR" "$pkg"
done
ls "$DIR"
