#!/usr/bin/env bash
# The BlockPress image's install and start steps, in one place: the Dockerfile runs `install` and
# `check`, and uses `start` as its entrypoint; tests/integration/test_image.py runs the same three.
#
#   image.sh install SRC [VENV]  install constraints/lock.txt, then the package from SRC, into VENV
#                                (default /opt/venv). With TORCH_INDEX_URL set (the PyTorch CUDA index,
#                                e.g. https://download.pytorch.org/whl/cu130), torch comes from there at
#                                the lock's version, built for this machine's architecture; every other
#                                package is installed exactly as locked.
#   image.sh check               what the image must hold: the CLI, the shipped tiny checkpoint, and a
#                                CUDA torch when REQUIRE_CUDA=1.
#   image.sh start ROLE [ARG...] gateway | replicas: the `blockpress` command with ARGs; smoke: one short
#                                generation on the tiny checkpoint (BLOCKPRESS_DEVICE, default auto);
#                                anything else runs as given (KubeRay starts `ray start ...` this way).
set -euo pipefail

VENV=${VENV:-/opt/venv}

install() {
    local src=$1 venv=${2:-$VENV}
    local lock="$src/constraints/lock.txt"
    [[ -f $lock ]] || { echo "image.sh: no lock at $lock" >&2; exit 2; }
    [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
    local pip=("$venv/bin/python" -m pip --disable-pip-version-check)
    if [[ -n ${TORCH_INDEX_URL:-} ]]; then
        # The lock pins the CPU build (+cpu); the image wants the same release built against CUDA.
        local torch_version
        torch_version=$(sed -n 's/^torch==\([^+ ]*\).*/\1/p' "$lock")
        [[ -n $torch_version ]] || { echo "image.sh: the lock pins no torch" >&2; exit 2; }
        local rest
        rest=$(mktemp)
        grep -v '^torch==' "$lock" > "$rest"
        "${pip[@]}" install --no-cache-dir -r "$rest"
        rm -f "$rest"
        "${pip[@]}" install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==$torch_version"
    else
        "${pip[@]}" install --no-cache-dir -r "$lock"
    fi
    # --no-deps: what the package needs is what the lock installed; --no-build-isolation: built with
    # the locked setuptools. Not editable: the image carries the package, checkpoint included.
    "${pip[@]}" install --no-cache-dir --no-deps --no-build-isolation "$src"
    "${pip[@]}" check
}

check() {
    local python="$VENV/bin/python"
    command -v "$VENV/bin/blockpress" >/dev/null || { echo "image.sh: no blockpress CLI in $VENV" >&2; exit 1; }
    REQUIRE_CUDA=${REQUIRE_CUDA:-0} "$python" - <<'PY'
import os
import sys

from blockpress.workers.checkpoints import TINY_CALCULATOR

missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (TINY_CALCULATOR / f).is_file()]
if missing:
    sys.exit(f"image.sh: the tiny checkpoint at {TINY_CALCULATOR} lacks {missing}")
if os.environ["REQUIRE_CUDA"] == "1":
    import torch

    if torch.version.cuda is None:
        sys.exit(f"image.sh: torch {torch.__version__} is not a CUDA build")
print(f"image ok: tiny checkpoint at {TINY_CALCULATOR}")
PY
}

smoke() {
    "$VENV/bin/python" - <<'PY'
import json
import os

from blockpress.runtime.contracts.settings import DenoiseSettings
from blockpress.workers.checkpoints import TINY_CALCULATOR
from blockpress.workers.engine import DiffusionEngine

quantization = os.environ.get("SMOKE_QUANTIZATION") or None
engine = DiffusionEngine.from_pretrained(
    str(TINY_CALCULATOR), device=os.environ.get("BLOCKPRESS_DEVICE", "auto"), quantization=quantization
)
result = engine.generate("What is 2+3?", DenoiseSettings(max_new_tokens=16, max_denoising_steps=4, seed=0))
print(json.dumps({"model": engine.model_name, "device": str(engine.device), "precision": engine.precision,
                  "tokens": len(result.token_ids), "text": result.text}))
PY
}

start() {
    local role=${1:?usage: image.sh start gateway|replicas|smoke|COMMAND [ARG...]}
    shift
    case $role in
        gateway | replicas) exec "$VENV/bin/blockpress" "$role" "$@" ;;
        smoke) smoke ;;
        *) exec "$role" "$@" ;;
    esac
}

case ${1:-} in
    install) shift; install "$@" ;;
    check) check ;;
    start) shift; start "$@" ;;
    *) echo "usage: image.sh install SRC [VENV] | check | start ROLE [ARG...]" >&2; exit 2 ;;
esac
