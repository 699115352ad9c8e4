#!/usr/bin/env bash
# Build or reuse an environment for lmms-eval (the `lmms` extra) layered over the main one:
#   scripts/setup_lmms_venv.sh MAIN_VENV LMMS_VENV        (setup_venv.sh --lmms: .venv .venv-lmms)
# lmms-eval brings ~600 MB of dependencies of its own (and pins some, e.g. protobuf 6) that must not
# enter the main environment. LMMS_VENV sees MAIN_VENV's packages (torch, deepspeed, ...) through a
# .pth file, so pip installs only what lmms-eval adds, next to one torch; MAIN_VENV is not touched.
# Measured on the 2-core machine from the local package index: ~30 s and ~600 MB.
# Re-running is cheap: a stamp records what was installed for the current pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN=${1:?usage: $0 MAIN_VENV LMMS_VENV}
LMMS=${2:?usage: $0 MAIN_VENV LMMS_VENV}
STAMP=$LMMS/.cmoe-setup-stamp
WANT="$(sha256sum pyproject.toml scripts/setup_lmms_venv.sh | sha256sum | cut -c1-16)"
CHECK="import lmms_eval, torch, cmoe_vlm.eval.harness; from importlib.metadata import entry_points; \
assert any(e.name == 'cmoe_vlm' for e in entry_points(group='lmms_eval.models')), 'entry point missing'"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$LMMS/bin/python" -c "$CHECK" 2>/dev/null; then
  exit 0
fi
echo "[setup] lmms-eval in $LMMS/ (layered over $MAIN/; ~600 MB)"
[ -x "$LMMS/bin/python" ] || "$MAIN/bin/python" -m venv "$LMMS"
SITE_MAIN=$("$MAIN/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
SITE_LMMS=$("$LMMS/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir (not a bare path) also runs MAIN's .pth files, e.g. its editable install of this repo
echo "import site; site.addsitedir('$(cd "$SITE_MAIN" && pwd)')" > "$SITE_LMMS/cmoe-main-venv.pth"
"$LMMS/bin/python" -m pip install --disable-pip-version-check -q -e ".[lmms]"
"$LMMS/bin/python" -c "$CHECK; \
assert torch.__file__.startswith('$(cd "$SITE_MAIN" && pwd)'), f'a second torch was installed: {torch.__file__}'"
echo "$WANT" > "$STAMP"
echo "[setup] lmms-eval done: $("$LMMS/bin/python" -c 'import importlib.metadata as m; print("lmms-eval", m.version("lmms-eval"))'), $(du -sh "$LMMS" | cut -f1)"
