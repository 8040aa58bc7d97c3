#!/usr/bin/env bash
# Build `recall` with CUDA on a machine without a GPU and pack a bundle that runs on a GPU
# host having only the NVIDIA driver and PyTorch-style CUDA 13 libraries.
#
#   scripts/build-cuda.sh                 # CUDA 13.0 (580-series drivers), sm_90 (H100/H200)
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh
#
# What it does:
#  1. the CUDA toolkit from PyPI (scripts/cuda/requirements-$CUDA_VERSION.txt: pinned versions
#     and sha256), unpacked once into $RECALL_HOME/tools/cuda-$CUDA_VERSION;
#  2. a link-time stand-in for the driver's libcuda.so (the real one is loaded at run time),
#     generated from the driver functions cudarc declares;
#  3. `cargo build --release -p recall-host --features cuda` into target/cuda, and the plugins
#     with the ordinary release build (they never link candle: the same cdylibs as on CPU);
#  4. dist/recall-cuda-$CUDA_VERSION-sm$CUDA_COMPUTE_CAP/ with bin/recall, bin/plugins/*.so and
#     a launcher `recall` that finds libcublas/libcudart/libcurand/libnvrtc 13 (RECALL_CUDA_LIBS,
#     else a Python environment's nvidia/cu13/lib, as PyTorch's CUDA 13 wheels install them),
#     plus a .tar.gz of it.
set -euo pipefail

CUDA_VERSION="${CUDA_VERSION:-13.0}"
CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${RECALL_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/recall}"
REQ="$ROOT/scripts/cuda/requirements-$CUDA_VERSION.txt"
TK="$CACHE/tools/cuda-$CUDA_VERSION"
NAME="recall-cuda-$CUDA_VERSION-sm$CUDA_COMPUTE_CAP"
DIST="$ROOT/dist/$NAME"

[ -f "$REQ" ] || { echo "no pinned toolkit for CUDA $CUDA_VERSION ($REQ); available: $(ls "$ROOT/scripts/cuda")" >&2; exit 2; }

if [ ! -f "$TK/.complete" ]; then
    echo "== fetching the CUDA $CUDA_VERSION toolkit from PyPI (pinned, sha256-checked)"
    rm -rf "$TK.partial" && mkdir -p "$TK.partial/wheels"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
        --python-version 3.11 -r "$REQ" -d "$TK.partial/wheels"
    for w in "$TK.partial"/wheels/*.whl; do
        python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$TK.partial"
    done
    rm -rf "$TK.partial/wheels"
    touch "$TK.partial/.complete"
    rm -rf "$TK" && mv "$TK.partial" "$TK"
fi
export CUDA_HOME="$TK/nvidia/cu${CUDA_VERSION%%.*}"
chmod +x "$CUDA_HOME"/bin/* "$CUDA_HOME"/nvvm/bin/* 2>/dev/null || true   # zip drops exec bits

LINK="$TK/link"
if [ ! -f "$LINK/libcuda.so" ]; then
    echo "== link-time libcuda stand-in"
    mkdir -p "$LINK"
    CUDARC_SYS="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-*/src/driver/sys/mod.rs' | sort | tail -1)"
    [ -n "$CUDARC_SYS" ] || { (cd "$ROOT" && cargo fetch) && CUDARC_SYS="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-*/src/driver/sys/mod.rs' | sort | tail -1)"; }
    grep -oE '^ *fn cu[A-Za-z0-9_]+\(' "$CUDARC_SYS" | sed -E 's/^ *fn (cu[A-Za-z0-9_]+)\(/int \1(void) { return 999; }/' | sort -u > "$LINK/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/libcuda_stub.c"
fi
for lib in cublas cublasLt cudart nvrtc; do ln -sf "$CUDA_HOME/lib/lib$lib.so.${CUDA_VERSION%%.*}" "$LINK/lib$lib.so"; done
ln -sf "$(ls "$CUDA_HOME"/lib/libcurand.so.* | head -1)" "$LINK/libcurand.so"

echo "== cargo build --release -p recall-host --features cuda (sm_$CUDA_COMPUTE_CAP)"
export PATH="$CUDA_HOME/bin:$PATH" CUDA_COMPUTE_CAP
export LD_LIBRARY_PATH="$CUDA_HOME/lib:$CUDA_HOME/nvvm/lib64:${LD_LIBRARY_PATH:-}"
(cd "$ROOT" && RUSTFLAGS="-L native=$LINK ${RUSTFLAGS:-}" cargo build --release -p recall-host --features cuda --target-dir target/cuda)
echo "== plugins (the ordinary release build)"
PLUGINS=$(cd "$ROOT" && ls -d plugins/*/ | xargs -n1 basename | grep -v clip-common | sed 's/^/-p recall-plugin-/')
(cd "$ROOT" && cargo build --release $PLUGINS)

echo "== packing $DIST"
rm -rf "$DIST" && mkdir -p "$DIST/bin/plugins"
cp "$ROOT/target/cuda/release/recall" "$DIST/bin/recall"
cp "$ROOT"/target/release/librecall_plugin_*.so "$DIST/bin/plugins/"
cp "$ROOT/scripts/gpu-check.sh" "$ROOT/scripts/torch_step.py" "$DIST/"
mkdir -p "$DIST/experiments"
cp "$ROOT/experiments/quickstart.toml" "$ROOT/experiments/gpu-bench.toml" "$DIST/experiments/"
cat > "$DIST/recall" <<'LAUNCHER'
#!/usr/bin/env bash
# Launch the CUDA build of recall with the CUDA 13 user-space libraries on the library path:
# RECALL_CUDA_LIBS if set, else the nvidia/cu13/lib of the first Python environment that has
# one (PyTorch's CUDA 13 wheels install it). The NVIDIA driver provides libcuda.
here="$(cd "$(dirname "$0")" && pwd)"
libs="${RECALL_CUDA_LIBS:-}"
if [ -z "$libs" ]; then
    for py in python3 python; do
        command -v "$py" >/dev/null || continue
        libs="$("$py" - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
for r in roots:
    for d in glob.glob(os.path.join(r, "nvidia", "cu13", "lib")):
        if glob.glob(os.path.join(d, "libcublas.so.13")):
            print(d); raise SystemExit
PY
)"
        [ -n "$libs" ] && break
    done
fi
if [ -z "$libs" ]; then
    echo "recall (CUDA): cannot find libcublas.so.13; set RECALL_CUDA_LIBS to a directory with the CUDA 13 libraries" >&2
    exit 1
fi
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$here/bin/recall" "$@"
LAUNCHER
chmod +x "$DIST/recall"
(cd "$ROOT/dist" && tar czf "$NAME.tar.gz" "$NAME")
ls -la "$ROOT/dist/$NAME.tar.gz"
echo "bundle: $DIST (run $DIST/recall ...)"
