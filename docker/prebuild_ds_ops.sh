#!/usr/bin/env bash
# Reinstall DeepSpeed with some of its C++/CUDA ops compiled in (run by docker/Dockerfile):
#   docker/prebuild_ds_ops.sh "CPU_ADAM FUSED_ADAM"     (names as in DeepSpeed's DS_BUILD_<NAME>)
# DeepSpeed compiles its ops just in time by default; a prebuilt op saves every rank that first
# compile. An empty list, or a base image without nvcc, keeps the just-in-time build and says so,
# so that a CPU-only build still succeeds.
set -euo pipefail

ops="${1:-}"
if [[ -z "${ops}" ]]; then
    echo "DeepSpeed ops: prebuild off (DS_PREBUILD_OPS is empty); ops build just in time"
    exit 0
fi
if ! command -v nvcc >/dev/null; then
    echo "DeepSpeed ops: no nvcc in this base image; skipping the prebuild of ${ops}; ops build just in time"
    exit 0
fi

# DS_ACCELERATOR=cuda: the build machine has no GPU, and DeepSpeed would otherwise pick its CPU builders.
export DS_ACCELERATOR=cuda

# mode "names": DS_BUILD_<NAME> -> op name, refusing unknown names before a long build;
# mode "verify": each requested op is in the installed build (setup.py drops an op it finds
# incompatible, e.g. a CUDA version mismatch, with a warning only).
check_ops() {
    python - "$@" <<'EOF'
import sys

from deepspeed.git_version_info import installed_ops
from deepspeed.ops.op_builder.all_ops import ALL_OPS

mode, requested = sys.argv[1], sys.argv[2:]
by_var = {builder.BUILD_VAR.removeprefix("DS_BUILD_"): name for name, builder in ALL_OPS.items()}
unknown = [op for op in requested if op not in by_var]
if unknown:
    sys.exit(f"DS_PREBUILD_OPS: unknown op(s) {unknown}; choose from {sorted(by_var)}")
if mode == "verify":
    missing = [op for op in requested if not installed_ops.get(by_var[op])]
    if missing:
        sys.exit(f"DeepSpeed ops: requested but not prebuilt: {missing} (the build log above says why)")
    print("DeepSpeed ops prebuilt:", ", ".join(by_var[op] for op in requested))
EOF
}

# shellcheck disable=SC2086  # the op list splits on spaces on purpose
check_ops names ${ops}
build_flags=()
for op in ${ops}; do
    build_flags+=("DS_BUILD_${op}=1")
done
echo "DeepSpeed ops: prebuilding ${build_flags[*]} for TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset, the DeepSpeed default}"
# setup.py must import the installed torch: no build isolation, so setuptools goes into the venv.
pip install --no-cache-dir -c constraints.txt setuptools wheel
env "${build_flags[@]}" DS_BUILD_OPS=0 \
    pip install --no-cache-dir --no-build-isolation --no-deps --force-reinstall -c constraints.txt deepspeed
# shellcheck disable=SC2086
check_ops verify ${ops}
