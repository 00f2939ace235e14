#!/usr/bin/env bash
# Compile-check the CUDA code paths on a machine without a GPU or a CUDA
# install: nvcc, the runtime headers and CCCL (libcu++'s <nv/target>) come
# from PyPI (NVIDIA's nvidia-cuda-nvcc, nvidia-cuda-runtime and nvidia-cuda-cccl
# wheels; CUDA 13.4, the newest that cudarc 0.19 (candle 0.11) knows;
# the -cu12 nvcc wheels ship only ptxas). Nothing runs on a GPU.
#
#   scripts/check-cuda.sh            # cargo check --workspace --features cuda
#
# Env: CUDA_VENV (default $TMPDIR/fusechat-cuda-venv), CUDA_COMPUTE_CAP
# (default 80), CARGO_TARGET_DIR (default target/cuda-check).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CUDA_VENV:-${TMPDIR:-/tmp}/fusechat-cuda-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  "nvidia-cuda-nvcc==13.4.*" "nvidia-cuda-runtime==13.4.*" "nvidia-cuda-crt==13.4.*" \
  "nvidia-nvvm==13.4.*" "nvidia-cuda-cccl<14"
cuda="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
export CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
export PATH="$cuda/bin:$PATH"
export NVCC_PREPEND_FLAGS="-I$cuda/include/cccl ${NVCC_PREPEND_FLAGS:-}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda-check}"
nvcc --version | tail -1
cargo check --workspace --all-targets --features cuda
