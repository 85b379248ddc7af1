# Sourced by scripts/run (need=run) and scripts/test (need=test): make .venv if missing and install what
# that script needs: running needs the project and its packages, testing adds the `test` extra (pytest,
# diffusers, peft, transformers, ComfyUI's packages: much larger). The stamp records the install's kind,
# so scripts/test after scripts/run adds the test extra and scripts/run after scripts/test installs
# nothing; either re-installs when pyproject.toml or this file changed.
set -euo pipefail
need="${need:-run}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
torch_pin="torch==2.13.0"  # the default; a torch already in .venv (another build, CUDA version) is kept
step() { echo "==> $*" >&2; }
if [ ! -x .venv/bin/python ]; then
    step "creating .venv with $($py --version)"
    "$py" -m venv .venv
fi
stamp=.venv/.int8-studio-installed
want="$(sha256sum pyproject.toml scripts/_venv.sh | sha256sum | cut -c1-16)"
read -r have_hash have_kind 2>/dev/null < "$stamp" || { have_hash=""; have_kind=""; }
pip=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar on)
n=3; [ "$need" = test ] && n=4
if [ "$have_hash" != "$want" ]; then
    step "[1/$n] updating pip"
    "${pip[@]}" -q --upgrade pip
    # torch first and pinned, so pip does not pick a newer multi-GB build for us.
    if have="$(.venv/bin/python -c "import torch; print(torch.__version__)" 2>/dev/null)"; then
        step "[2/$n] torch $have is installed: keeping it"
    else
        step "[2/$n] installing $torch_pin (pip picks the build for this machine: CPU, or CUDA, about 1 GB)…"
        "${pip[@]}" "$torch_pin"
    fi
    step "[3/$n] installing INT8 Studio and its packages (Qt, safetensors, huggingface_hub, …)…"
    "${pip[@]}" -e .
    have_kind=run
    echo "$want run" > "$stamp"
fi
if [ "$need" = test ] && [ "$have_kind" != test ]; then
    step "[4/$n] installing the test packages (pytest, diffusers, peft, transformers, ComfyUI's packages)…"
    "${pip[@]}" -e ".[test]"
    echo "$want test" > "$stamp"
fi
# Qt needs a few system libraries that minimal Debian/Ubuntu images lack (EGL, GL, xkbcommon,
# fontconfig, D-Bus, GLib) and a font; install them when we may and they are missing.
if ! .venv/bin/python -c "import PySide6.QtGui" 2>/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    step "installing the system libraries Qt needs (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends libegl1 libgl1 libxkbcommon0 libfontconfig1 \
        libdbus-1-3 libglib2.0-0 fonts-dejavu-core >/dev/null
fi
export PATH="$root/.venv/bin:$PATH"
