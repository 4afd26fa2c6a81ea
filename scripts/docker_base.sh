#!/usr/bin/env bash
# Build the image base without a container registry: Debian bookworm from Debian's package
# mirror (debootstrap, minbase) with python3 and python3-venv, imported as a Docker image.
#
#     scripts/docker_base.sh [NAME]        # default: gemma-export-base:bookworm-r3
#
# Prints the image name on stdout. An image of that name already present is reused (CI
# reruns on one machine); bump the tag's revision when this recipe changes. Needs root,
# debootstrap and a running Docker daemon. DEBIAN_MIRROR overrides the mirror (default:
# the first Debian URI in this machine's apt sources, else deb.debian.org).
set -euo pipefail

NAME=${1:-gemma-export-base:bookworm-r3}
if docker image inspect "$NAME" >/dev/null 2>&1; then
    echo "base: $NAME present, reused" >&2
    echo "$NAME"
    exit 0
fi

mirror=${DEBIAN_MIRROR:-}
if [[ -z $mirror ]]; then
    # deb822 (URIs: ...) or one-line (deb URL suite ...) sources; the main archive, not security.
    mirror=$(grep -hoE '(URIs:[[:space:]]*|^deb[[:space:]]+)https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null | head -n1 | grep -oE 'https?://[^[:space:]]+' || true)
    mirror=${mirror:-http://deb.debian.org/debian}
fi

root=$(mktemp -d /var/tmp/gemma-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
# mktemp's 0700 becomes the image's / (tar records "."): overlay2 hides it, vfs keeps it and
# a non-root user then cannot reach any file.
chmod 0755 "$root"
echo "base: debootstrap bookworm from $mirror" >&2
# minbase + the interpreter; python3-venv brings ensurepip's bundled pip for the builder stage.
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$mirror" >&2

# An imported root filesystem has no image config: the PATH below is the one official Debian
# images set (without it, a Dockerfile's ENV PATH=/opt/venv/bin:$PATH drops /usr/bin).
#
# Security and point-release updates, then what an image needs none of: apt's lists and
# caches, documentation, man pages, translations.
cat > "$root/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian*}/debian-security bookworm-security main
SOURCES
if chroot "$root" apt-get update -qq >&2 && chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get -y -qq upgrade >&2; then
    echo "base: bookworm-updates / bookworm-security applied" >&2
else
    echo "base: warning: could not apply updates (mirror without bookworm-security?); base is the bookworm release" >&2
fi
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/*
tar --numeric-owner -C "$root" -c . \
    | docker import --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$NAME" >&2
# Earlier revisions of this recipe are dead weight now.
docker images --format '{{.Repository}}:{{.Tag}}' "${NAME%%:*}" | grep -vxF "$NAME" | xargs -r docker rmi >&2 || true
echo "$NAME"
