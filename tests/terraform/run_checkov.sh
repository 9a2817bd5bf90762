#!/usr/bin/env bash
# Static security checks of the Terraform modules with checkov.
#
# checkov pins an older boto3 than cloudckpt needs, so it lives in its own virtual
# environment (.venv-checkov at the repository root, created on first use). Fails
# when any check fails or a file does not parse; skipped checks are allowed only
# with a "#checkov:skip=CKV_...:reason" comment next to the resource.
#
# Environment:
#   CHECKOV_VENV  where the virtual environment lives (default: <repo>/.venv-checkov)
#   CHECKOV_SPEC  what pip installs (default: checkov; e.g. checkov==3.3.30 to pin)
#   PYTHON        interpreter that creates the venv (default: python3)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
venv="${CHECKOV_VENV:-$repo/.venv-checkov}"

if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
# Keep the environment out of git without touching the repository's .gitignore.
[ -f "$venv/.gitignore" ] || printf '*\n' > "$venv/.gitignore"
if [ ! -x "$venv/bin/checkov" ]; then
  echo "installing ${CHECKOV_SPEC:-checkov} into $venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "${CHECKOV_SPEC:-checkov}"
fi
echo "checkov $("$venv/bin/checkov" --version)"

status=0
for module in terraform/aws terraform/gcp; do
  echo "== checkov -d $module"
  # --skip-download: no calls to the Prisma Cloud API (guidelines, severities); the
  # checks themselves all run locally.
  if ! output="$("$venv/bin/checkov" -d "$module" --quiet --compact --skip-download 2>&1)"; then
    status=1
  fi
  printf '%s\n' "$output"
  # checkov exits 0 on files it cannot parse; treat that as a failure too.
  if grep -Eq 'Parsing errors: [1-9]' <<<"$output"; then
    echo "checkov could not parse files under $module" >&2
    status=1
  fi
  if ! grep -q 'Passed checks:' <<<"$output"; then
    echo "checkov printed no results for $module" >&2
    status=1
  fi
done
exit "$status"
