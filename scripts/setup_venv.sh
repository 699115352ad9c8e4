#!/usr/bin/env bash
# Create or reuse .venv/ in the repo root with everything cmoe-vlm needs, from nothing.
# Order matters: torch + torchvision first (pinned: these versions install from local disk on our
# machines), then DeepSpeed without build isolation (its setup imports torch), then the project.
# Re-running is cheap: a stamp file records what was installed for the current pyproject.toml.
# --lmms: also build .venv-lmms/ for lmms-eval, layered over .venv/ (scripts/setup_lmms_venv.sh;
# ~30 s and ~600 MB more); `make test` asks for it, the harness test runs lmms-eval from there.
set -euo pipefail
cd "$(dirname "$0")/.."
LMMS=0
for arg in "$@"; do
  case "$arg" in
    --lmms) LMMS=1 ;;
    *) echo "usage: $0 [--lmms]" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
STAMP=.venv/.cmoe-setup-stamp
WANT="$(sha256sum pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c "import torch, deepspeed, timm, webdataset, cmoe_vlm" 2>/dev/null; then
  [ "$LMMS" = 0 ] || bash scripts/setup_lmms_venv.sh .venv .venv-lmms
  exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip install --disable-pip-version-check -q"
# pip is silent while it unpacks and installs (minutes for torch): a line every 30 s says it is alive
pip_with_ticker() {
  local start=$SECONDS
  ( while sleep 30; do echo "[setup]   ... still installing ($((SECONDS - start)) s)"; done ) &
  local ticker=$!
  local rc=0
  $PIP "$@" || rc=$?
  kill "$ticker" 2>/dev/null; wait "$ticker" 2>/dev/null || true
  echo "[setup]   took $((SECONDS - start)) s"
  return "$rc"
}
echo "[setup] torch + torchvision ($TORCH_PINS; the first time the longest step: see README, Quick start)"
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  pip_with_ticker $TORCH_PINS
fi
echo "[setup] deepspeed"
.venv/bin/python -c "import deepspeed" 2>/dev/null || pip_with_ticker --no-build-isolation deepspeed
echo "[setup] cmoe-vlm (editable) with dev, eval and wandb extras"
pip_with_ticker -e ".[dev,eval,wandb]"
echo "$WANT" > "$STAMP"
echo "[setup] done: $(.venv/bin/python -c 'import cmoe_base, torch, deepspeed, timm; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "timm", timm.__version__)' 2>/dev/null)"
[ "$LMMS" = 0 ] || bash scripts/setup_lmms_venv.sh .venv .venv-lmms
