#!/usr/bin/env bash
# Download the wheels the image needs into docker/wheels, on the host, for an image base:
# its python version and glibc decide the tags. The image is then built with
# `--build-arg PIP_OFFLINE=1`: pip inside the build reaches no index, so it needs neither
# network nor this machine's CA bundle (registries here sit behind a proxy with its own root).
#
#     scripts/docker_wheels.sh BASE_IMAGE [PYTHON]     # PYTHON: a host python with pip
set -euo pipefail
cd "$(dirname "$0")/.."
base=$1
py=${2:-python3}

read -r pyver glibc < <(docker run --rm --network none --entrypoint python3 "$base" -c \
    'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.libc_ver()[1])')
# pip does not widen one manylinux_2_N tag to the older ones, so list them all.
platforms=(--platform linux_x86_64 --platform manylinux2014_x86_64)
for ((minor = 17; minor <= ${glibc#2.}; minor++)); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
find docker/wheels -name '*.whl' -delete
# setuptools: the builder builds gemma-export from source, isolated, from these wheels too.
mkdir -p build/docker
if ! "$py" -m pip download -q -d docker/wheels --only-binary=:all: --implementation cp \
        --python-version "$pyver" "${platforms[@]}" -c constraints.txt ".[serve]" "setuptools>=68" >build/docker/wheels.log 2>&1; then
    cat build/docker/wheels.log >&2
    exit 1
fi
n=$(find docker/wheels -name '*.whl' | wc -l)
echo "wheels: $n for python $pyver, glibc $glibc in docker/wheels" >&2
(( n > 0 ))
