# Sourced by scripts/run and scripts/test: make .venv if missing and (re)install the project
# whenever pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($py --version)"
    "$py" -m venv .venv
fi
stamp=.venv/.int8-studio-installed
want="$(sha256sum pyproject.toml scripts/_venv.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first and pinned, so pip does not pick a newer multi-GB build for us.
    .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
