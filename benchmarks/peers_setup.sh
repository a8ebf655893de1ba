#!/usr/bin/env bash
# peers_setup.sh - build the virtual environment of the PEER tools used by benchmarks/peers.py:
# AutoRound (auto-round) and llm-compressor. They are peers to compare against, never bitsmith dependencies,
# so they live in their own venv OUTSIDE the repository.
#
# usage: benchmarks/peers_setup.sh            # venv at ${PEERS_VENV:-/tmp/bitsmith-peers-venv}
#        PEERS_VENV=DIR benchmarks/peers_setup.sh
#
# torch is installed FIRST and ALONE (torch==2.13.0, the CPU wheel here), then llm-compressor and AutoRound at
# versions that agree with each other (llmcompressor 0.14.0.1 pins auto-round<=0.15.1 and transformers<=5.17).
# The script stops if torch changed or has CUDA. Re-running it on a complete venv does nothing.
set -euo pipefail

VENV="${PEERS_VENV:-/tmp/bitsmith-peers-venv}"
TORCH_REQ="${PEERS_TORCH_PIP:-torch==2.13.0}"
PEER_REQS=(llmcompressor==0.14.0.1 auto-round==0.15.1)

die() { echo "peers_setup.sh: error: $*" >&2; exit 2; }
say() { echo "peers_setup.sh: $*" >&2; }

case "$(cd "$(dirname "$VENV")" 2>/dev/null && pwd)/" in
  "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/"*) die "PEERS_VENV=$VENV is inside the repository; put it outside (default /tmp/bitsmith-peers-venv)" ;;
esac
command -v python3 >/dev/null || die "python3 not found"

if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

torch_version() { "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null || true; }

if [ -z "$(torch_version)" ]; then
  say "installing $TORCH_REQ (alone, first)"
  "$PY" -m pip install "$TORCH_REQ"
fi
before="$(torch_version)"
case "$before" in
  *" None") ;;
  *) die "torch in $VENV is '$before' (CUDA build or missing); set PEERS_TORCH_PIP to a CPU-only requirement and start from an empty venv" ;;
esac

if ! "$PY" -c 'import auto_round, llmcompressor' 2>/dev/null; then
  say "installing ${PEER_REQS[*]}"
  "$PY" -m pip install "${PEER_REQS[@]}"
fi
after="$(torch_version)"
[ "$after" = "$before" ] || die "installing the peers changed torch from '$before' to '$after'; rebuild the venv"

"$PY" - <<'PY'
from importlib.metadata import version
import torch
names = ["torch", "transformers", "auto-round", "llmcompressor", "compressed-tensors", "accelerate", "datasets", "numpy"]
print("peers venv ready: " + ", ".join(f"{n} {version(n)}" for n in names) + f" (torch CUDA: {torch.version.cuda})")
PY
echo "$VENV/bin/python"
