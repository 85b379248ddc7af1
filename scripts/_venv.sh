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
# Qt needs a few system libraries that minimal Debian/Ubuntu images lack (EGL, GL, xkbcommon,
# fontconfig, D-Bus, GLib) and a font; install them when we may and they are missing.
if ! .venv/bin/python -c "import PySide6.QtGui" 2>/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing the system libraries Qt needs (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends libegl1 libgl1 libxkbcommon0 libfontconfig1 \
        libdbus-1-3 libglib2.0-0 fonts-dejavu-core >/dev/null
fi
export PATH="$root/.venv/bin:$PATH"
