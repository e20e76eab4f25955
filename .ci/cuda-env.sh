# Source me:  source .ci/cuda-env.sh && cargo build --release --features cuda
# (A copy of the team's shared/cuda/build-env.sh without its candle-flash-attn part, so that CI
# needs nothing outside the clone but PyPI.)
# Sets up a CUDA 13.0 build environment for candle 0.11.x (cuda feature) on a machine
# with NO GPU and NO CUDA toolkit, using only PyPI wheels. Idempotent.
#
# Why CUDA 13.0 exactly: candle-kernels compiles its .cu files to PTX, which the driver
# JIT-compiles at run time. The target runs driver 580 (= CUDA 13.0), which rejects PTX
# produced by a newer nvcc (13.1+ emits PTX ISA >= 9.1 -> CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
# The binary links (DT_NEEDED) libcudart.so.13, libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10, libnvrtc.so.13 and libcuda.so.1; at run time on the target put the
# directory holding them (torch's site-packages/nvidia/cu13/lib) on LD_LIBRARY_PATH.
CUDABUILD=${CUDABUILD:-${XDG_CACHE_HOME:-$HOME/.cache}/ldm-cuda-build}
CUDA_PIP_VERSIONS="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35"
# Optional (cudnn feature, WITH_CUDNN=1): nvidia-cudnn-cu13
CUDNN_PIP_VERSION=${CUDNN_PIP_VERSION:-nvidia-cudnn-cu13==9.13.0.50}

mkdir -p "$CUDABUILD"
if [ ! -x "$CUDABUILD/venv/bin/python" ]; then
  python3 -m venv "$CUDABUILD/venv" || return 1 2>/dev/null || exit 1
fi
_pyver=$("$CUDABUILD/venv/bin/python" -c 'import sys;print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
export CUDA_PIP_ROOT="$CUDABUILD/venv/lib/$_pyver/site-packages/nvidia/cu13"
if [ ! -x "$CUDA_PIP_ROOT/bin/nvcc" ] || [ ! -e "$CUDA_PIP_ROOT/lib/libcublas.so.13" ]; then
  "$CUDABUILD/venv/bin/pip" install -q $CUDA_PIP_VERSIONS || return 1 2>/dev/null || exit 1
fi
export CUDNN_PIP_ROOT="$CUDA_PIP_ROOT/../cudnn"
if [ "${WITH_CUDNN:-0}" = 1 ] && [ ! -e "$CUDNN_PIP_ROOT/lib/libcudnn.so.9" ]; then
  "$CUDABUILD/venv/bin/pip" install -q "$CUDNN_PIP_VERSION" || return 1 2>/dev/null || exit 1
fi

# Link-time directory: unversioned .so symlinks (the wheels ship only versioned names)
# plus a stub libcuda.so (SONAME libcuda.so.1) generated from cudarc's driver API list;
# every stub entry point returns CUDA_ERROR_STUB_LIBRARY (34). The real libcuda.so.1 of
# the NVIDIA driver is used at run time.
export CUDA_LINK_ROOT="$CUDABUILD/cuda-link"
mkdir -p "$CUDA_LINK_ROOT/lib" "$CUDA_LINK_ROOT/stub-runtime"
for _l in cudart cublas cublasLt nvrtc; do ln -sf "$CUDA_PIP_ROOT/lib/lib$_l.so.13" "$CUDA_LINK_ROOT/lib/lib$_l.so"; done
ln -sf "$CUDA_PIP_ROOT/lib/libcurand.so.10" "$CUDA_LINK_ROOT/lib/libcurand.so"
for _f in "$CUDNN_PIP_ROOT"/lib/libcudnn*.so.9; do
  [ -e "$_f" ] && ln -sf "$_f" "$CUDA_LINK_ROOT/lib/$(basename "$_f" .9)"
done
if [ ! -e "$CUDA_LINK_ROOT/lib/libcuda.so" ]; then
  _cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -1)
  if [ -z "$_cudarc" ]; then
    echo "build-env.sh: run 'cargo fetch' in the project first (need cudarc sources for the stub)" >&2
    return 1 2>/dev/null || exit 1
  fi
  { echo '/* link-time stub of libcuda.so.1: all entry points return CUDA_ERROR_STUB_LIBRARY */'
    grep -ohE '^pub unsafe fn cu[A-Za-z0-9_]+' "$_cudarc/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u \
      | sed 's/.*/int &(void) { return 34; }/'; } > "$CUDA_LINK_ROOT/libcuda_stub.c"
  gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$CUDA_LINK_ROOT/lib/libcuda.so" "$CUDA_LINK_ROOT/libcuda_stub.c" \
    || return 1 2>/dev/null || exit 1
fi
# Only for demonstrating the clean "no GPU" failure on this machine, never on the GPU box:
ln -sf "$CUDA_LINK_ROOT/lib/libcuda.so" "$CUDA_LINK_ROOT/stub-runtime/libcuda.so.1"

export PATH="$CUDA_PIP_ROOT/bin:$PATH"      # nvcc (cudarc reads `nvcc --version` -> cuda-13000)
export CUDA_HOME="$CUDA_PIP_ROOT"           # nvcc/include root (cudaforge, cudarc link search)
export CUDA_PATH="$CUDA_PIP_ROOT"
export CUDA_ROOT="$CUDA_LINK_ROOT"          # extra link search root (cudarc: $CUDA_ROOT/lib)
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}   # H100; no nvidia-smi here. 90 -> sm_90a / compute_90a
export CUDARC_CUDA_VERSION=13000
# run-time lookup of the CUDA libs when running *here* (with the stub) – harmless elsewhere
export CUDA_RUNTIME_LIBS="$CUDA_PIP_ROOT/lib"
unset _pyver _l _f _cudarc
echo "CUDA build env: $(nvcc --version | tail -2 | head -1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
