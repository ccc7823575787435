#!/usr/bin/env bash
# Developer check that the image works, with no container registry in reach:
#   1. makes a bare Debian bookworm base with debootstrap and `docker import` (reused when present),
#   2. builds docker/Dockerfile on it (pip still downloads the pinned wheels: several GB),
#   3. runs the smoke training inside the container, as the image's non-root user, on 2 CPU ranks
#      with no network: synthetic shards, `torchrun -m pipeline.train`, MLflow on a local SQLite store,
#   4. checks the exit status and the final eval line, prints a summary, exits non-zero on failure.
# Needs root (dockerd, debootstrap), docker.io and debootstrap. Starts dockerd when none answers and
# stops it again at the end. Takes many minutes: a documented developer check, not a CI job.
#
#   docker/check_image.sh                 # removes the checked image at the end, keeps the small base
#   docker/check_image.sh --keep          # keeps the image too (reruns then reuse its layers)
#   docker/check_image.sh --host-wheels   # pip downloads on the host; the build installs offline
# --host-wheels is for hosts whose HTTPS goes through a proxy with its own CA (the bare base does not
# trust it) or that cache wheels: `pip download` runs with the host's pip settings into
# $CHECK_LOG_DIR/wheels, served on 127.0.0.1 to the build. Needs the host's python3 to be 3.11.
# Environment: BASE_TAG (default vit-pipeline-base:bookworm), IMAGE_TAG (default vit-pipeline:check),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), CHECK_LOG_DIR (default $TMPDIR or /tmp, then
# vit-pipeline-docker-check), CHECK_WHEEL_PORT (default 38417, for --host-wheels).
set -euo pipefail

BASE_TAG="${BASE_TAG:-vit-pipeline-base:bookworm}"
IMAGE_TAG="${IMAGE_TAG:-vit-pipeline:check}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Outside the repository: runs/ is cleaned by other tools, and the wheel cache holds GBs.
LOG_DIR="${CHECK_LOG_DIR:-${TMPDIR:-/tmp}/vit-pipeline-docker-check}"
# A fixed port: build args are part of Docker's layer cache key, a new port would rebuild every layer.
WHEEL_PORT="${CHECK_WHEEL_PORT:-38417}"
EVAL_PATTERN="eval at step 30: top-1"
KEEP_IMAGE=0
HOST_WHEELS=0

for arg in "$@"; do
    case "${arg}" in
        --keep) KEEP_IMAGE=1 ;;
        --host-wheels) HOST_WHEELS=1 ;;
        -h | --help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "check_image.sh: unknown argument '${arg}' (use --keep, --host-wheels or --help)" >&2; exit 2 ;;
    esac
done

mkdir -p "${LOG_DIR}"
STARTED_DOCKERD_PID=""
WHEEL_SERVER_PID=""
BUILD_ARGS=(--build-arg BASE_IMAGE="${BASE_TAG}")
declare -A SECONDS_TAKEN=()
base_note=""

log() { echo "[check_image $(date +%H:%M:%S)] $*"; }

need() {
    command -v "$1" >/dev/null || { echo "check_image.sh: '$1' not found; install it: $2" >&2; exit 2; }
}

stop_started() {
    if [[ -n "${WHEEL_SERVER_PID}" ]]; then
        kill "${WHEEL_SERVER_PID}" 2>/dev/null || true
        wait "${WHEEL_SERVER_PID}" 2>/dev/null || true
    fi
    if [[ -n "${STARTED_DOCKERD_PID}" ]]; then
        log "stopping the dockerd this check started (pid ${STARTED_DOCKERD_PID})"
        kill "${STARTED_DOCKERD_PID}" 2>/dev/null || true
        wait "${STARTED_DOCKERD_PID}" 2>/dev/null || true
    fi
}
trap stop_started EXIT

ensure_dockerd() {
    if docker info >/dev/null 2>&1 </dev/null; then
        log "using the running Docker daemon"
        return
    fi
    [[ "$(id -u)" == 0 ]] || { echo "check_image.sh: no Docker daemon answers and starting one needs root" >&2; exit 2; }
    need dockerd "apt-get install docker.io"
    log "starting dockerd (log: ${LOG_DIR}/dockerd.log)"
    # No iptables/bridge: builds use the host network, the smoke run uses none.
    dockerd --iptables=false --ip6tables=false --bridge=none </dev/null >"${LOG_DIR}/dockerd.log" 2>&1 &
    STARTED_DOCKERD_PID=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 </dev/null && return
        kill -0 "${STARTED_DOCKERD_PID}" 2>/dev/null || break
        sleep 1
    done
    echo "check_image.sh: dockerd did not come up; see ${LOG_DIR}/dockerd.log" >&2
    exit 1
}

# A Debian bookworm minbase, like the CUDA images a bare OS without Python, so the Dockerfile's own
# Python install is what the check exercises. bookworm's python3 is 3.11, the version CI pins for.
ensure_base() {
    if docker image inspect "${BASE_TAG}" >/dev/null 2>&1 </dev/null; then
        base_note="reused ${BASE_TAG}"
        return
    fi
    [[ "$(id -u)" == 0 ]] || { echo "check_image.sh: building the base with debootstrap needs root" >&2; exit 2; }
    need debootstrap "apt-get install debootstrap"
    local rootfs
    rootfs="$(mktemp -d)"
    log "debootstrap bookworm (minbase) into ${rootfs} (log: ${LOG_DIR}/debootstrap.log)"
    debootstrap --variant=minbase bookworm "${rootfs}" "${DEBIAN_MIRROR}" </dev/null >"${LOG_DIR}/debootstrap.log" 2>&1 \
        || { rm -rf "${rootfs}"; echo "check_image.sh: debootstrap failed; see ${LOG_DIR}/debootstrap.log" >&2; exit 1; }
    rm -rf "${rootfs}"/var/cache/apt/archives/*.deb "${rootfs}"/var/lib/apt/lists/*
    # An imported image has no config: give it the PATH and CMD a registry image would carry.
    tar -C "${rootfs}" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "${BASE_TAG}" >/dev/null \
        || { rm -rf "${rootfs}"; echo "check_image.sh: docker import of the base failed" >&2; exit 1; }
    rm -rf "${rootfs}"
    base_note="built ${BASE_TAG}"
}

# The wheels for the image's Python (bookworm: 3.11), downloaded with the host's pip settings and
# served on 127.0.0.1; the build (host network) installs from them with no index.
serve_host_wheels() {
    local wheels="${LOG_DIR}/wheels" requirements="${LOG_DIR}/runtime-requirements.txt" port
    python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
        || { echo "check_image.sh: --host-wheels needs the host's python3 to be 3.11, like the base's" >&2; exit 2; }
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('${REPO}/pyproject.toml', 'rb'))['project']['dependencies']))" \
        >"${requirements}" || exit 1
    log "pip download on the host into ${wheels} (log: ${LOG_DIR}/pip-download.log)"
    # setuptools and wheel: build requirements of the project and of DeepSpeed's source release.
    python3 -m pip download --dest "${wheels}" -c "${REPO}/constraints.txt" -r "${requirements}" \
        "setuptools>=68" wheel </dev/null >"${LOG_DIR}/pip-download.log" 2>&1 \
        || { echo "check_image.sh: pip download failed; see ${LOG_DIR}/pip-download.log" >&2; exit 1; }
    port="${WHEEL_PORT}"
    python3 -m http.server --bind 127.0.0.1 --directory "${wheels}" "${port}" </dev/null >"${LOG_DIR}/wheel-server.log" 2>&1 &
    WHEEL_SERVER_PID=$!
    sleep 1
    kill -0 "${WHEEL_SERVER_PID}" 2>/dev/null \
        || { echo "check_image.sh: cannot serve wheels on 127.0.0.1:${port} (set CHECK_WHEEL_PORT); see ${LOG_DIR}/wheel-server.log" >&2; exit 1; }
    BUILD_ARGS+=(--build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS="http://127.0.0.1:${port}/")
    log "serving $(find "${wheels}" -type f | wc -l) files ($(du -sh "${wheels}" | cut -f1)) on 127.0.0.1:${port}"
}

build_image() {
    log "docker build ${IMAGE_TAG} FROM ${BASE_TAG} (log: ${LOG_DIR}/build.log)"
    # --force-rm: a failed step leaves no stopped container behind (the legacy builder keeps them).
    docker build --network=host --force-rm "${BUILD_ARGS[@]}" \
        -f "${REPO}/docker/Dockerfile" -t "${IMAGE_TAG}" "${REPO}" </dev/null >"${LOG_DIR}/build.log" 2>&1
}

# Inside the container: not root, the pinned stack imports, then the tests' smoke training on 2 CPU
# ranks. --network none: a training rank must not need the internet; the container's hostname then
# does not resolve, so the rendezvous is on 127.0.0.1 (torchrun would otherwise wait 5 min per try
# on the hostname). --shm-size: DeepSpeed's CPU collectives and the data loader workers use /dev/shm
# (Docker's default is 64 MB). `timeout`: a hung rank fails the check instead of stalling it.
smoke_run() {
    log "smoke training in the container (log: ${LOG_DIR}/smoke.log)"
    docker run --rm --network none --shm-size 1g "${IMAGE_TAG}" bash -c '
        set -euo pipefail
        echo "user: $(id -un) uid=$(id -u)"
        [[ "$(id -u)" != 0 ]] || { echo "the image runs as root"; exit 1; }
        python -c "import sys, torch, deepspeed, mlflow, webdataset, pipeline; \
print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"deepspeed\", deepspeed.__version__, \"mlflow\", mlflow.__version__)"
        python -m pipeline.data write --out /tmp/shards --synthetic 400 --classes 4 --size 32
        timeout 900 torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29500 \
            -m pipeline.train --config configs/smoke.yaml data.path=/tmp/shards train.run_dir=/tmp/check/run
        echo "run dir:"; ls /tmp/check /tmp/check/run
    ' </dev/null >"${LOG_DIR}/smoke.log" 2>&1
}

timed() {
    local name="$1" start=${SECONDS}
    shift
    local rc=0
    "$@" || rc=$?
    SECONDS_TAKEN[${name}]=$((SECONDS - start))
    return "${rc}"
}

summary() {
    local result="$1" eval_line="$2"
    echo
    echo "== docker/check_image.sh summary ($(date '+%Y-%m-%d %H:%M %Z'))"
    echo "base:        ${base_note:-not reached} (${SECONDS_TAKEN[base]:-0} s)"
    [[ "${HOST_WHEELS}" == 0 ]] || echo "host wheels: ${SECONDS_TAKEN[wheels]:--} s"
    echo "build:       ${IMAGE_TAG} (${SECONDS_TAKEN[build]:--} s)${image_size:+, ${image_size}}"
    echo "smoke run:   ${SECONDS_TAKEN[smoke]:--} s; ${eval_line:-no eval line}"
    echo "total:       ${SECONDS} s"
    echo "logs:        ${LOG_DIR}"
    echo "result:      ${result}"
}

need docker "apt-get install docker.io"
image_size=""
ensure_dockerd
timed base ensure_base
if [[ "${HOST_WHEELS}" == 1 ]]; then
    timed wheels serve_host_wheels
fi
if ! timed build build_image; then
    tail -n 30 "${LOG_DIR}/build.log" || true
    summary "FAIL: docker build failed (see ${LOG_DIR}/build.log)" ""
    exit 1
fi
image_size="$(docker image inspect --format '{{.Size}}' "${IMAGE_TAG}" </dev/null | awk '{printf "%.1f GB", $1 / 1e9}')"

smoke_rc=0
timed smoke smoke_run || smoke_rc=$?
eval_line="$(grep -o "${EVAL_PATTERN}.*" "${LOG_DIR}/smoke.log" | tail -n 1 || true)"
grep -E "^(user:|python) " "${LOG_DIR}/smoke.log" || true

if [[ "${smoke_rc}" != 0 || -z "${eval_line}" ]]; then
    tail -n 30 "${LOG_DIR}/smoke.log" || true
    log "kept ${IMAGE_TAG} to debug (docker run --rm -it ${IMAGE_TAG} bash); remove it with: docker image rm ${IMAGE_TAG}"
    summary "FAIL: smoke run exit status ${smoke_rc}${eval_line:-, no '${EVAL_PATTERN}' line}" "${eval_line}"
    exit 1
fi
if [[ "${KEEP_IMAGE}" == 0 ]]; then
    docker image rm "${IMAGE_TAG}" </dev/null >/dev/null
    log "removed ${IMAGE_TAG} (--keep keeps it); kept the base ${BASE_TAG}"
fi
summary "PASS" "${eval_line}"
