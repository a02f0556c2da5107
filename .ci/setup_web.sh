#!/usr/bin/env bash
# Set-up for the webgpu target (targets/webgpu.py): emscripten and Node.js build the .wasm, Chromium
# runs artifacts in the tests (headless, on SwiftShader's WebGPU adapter), and npm brings tvmjs and
# puppeteer-core into web/node_modules (web/package-lock.json). Debian packages are installed only
# when missing. Then TVM's web runtime is compiled once into the cache (a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v emcc >/dev/null || need+=(emscripten)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
command -v chromium >/dev/null || need+=(chromium)
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
npm ci --prefix web --no-audit --no-fund --loglevel=error
python -m llmopt.codegen.webgpu_toolchain
