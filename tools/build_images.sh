#!/usr/bin/env bash
# `make images`: the CPU image (containers/Dockerfile.cpu) as ${EUPE_IMAGE:-eupe:latest} and the CUDA one
# (containers/Dockerfile.cuda) as ${EUPE_GPU_IMAGE:-eupe:latest-cuda}, from the repository root as the build
# context (.dockerignore keeps it small). Where no docker binary or no engine is there: one line, exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v docker > /dev/null 2>&1; then
  echo "make images: no docker binary on PATH: nothing built"
  exit 0
fi
if ! timeout 30 docker info > /dev/null 2>&1; then
  echo "make images: docker finds no running engine (docker info failed): nothing built"
  exit 0
fi

revision=$(git rev-parse HEAD 2> /dev/null || echo unknown)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
args=(--build-arg "VCS_REF=${revision}" --build-arg "VERSION=${version:-0.0.0}")
docker build -f containers/Dockerfile.cpu "${args[@]}" -t "${EUPE_IMAGE:-eupe:latest}" .
docker build -f containers/Dockerfile.cuda "${args[@]}" -t "${EUPE_GPU_IMAGE:-eupe:latest-cuda}" .
echo "make images: built ${EUPE_IMAGE:-eupe:latest} and ${EUPE_GPU_IMAGE:-eupe:latest-cuda}"
