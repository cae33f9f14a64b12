# Shared set-up steps of ./scripts/demo and ./scripts/test. Sourced, not run.
# Idempotent: each step checks first and does nothing when already done.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  say "installing Debian packages: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
    || { as_root apt-get update -qq >/dev/null && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }
}

ensure_python() {
  if ! command -v python3 >/dev/null; then apt_install python3 python3-venv; fi
  python3 - <<'PY' || { echo "Python 3.11 or newer is needed (found $(python3 --version))" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
  if [ ! -x "$PY" ] && ! python3 -m venv --help >/dev/null 2>&1; then apt_install python3-venv; fi
}

ensure_venv() {
  local extras="$1"  # e.g. "" or "[test,reference]"
  if [ ! -x "$PY" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV" || { rm -rf "$VENV"; apt_install python3-venv; python3 -m venv "$VENV"; }
  fi
  local stamp="$VENV/.installed$extras"
  local want
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing the appliance and its Python dependencies$extras into .venv"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -e "$ROOT$extras"
    echo "$want" > "$stamp"
  fi
}

ensure_mosquitto() {
  if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    apt_install mosquitto mosquitto-clients
  fi
  if ! command -v mosquitto_pub >/dev/null; then apt_install mosquitto-clients; fi
}

ensure_demo_model() {
  "$VENV/bin/appliance" --log-level WARNING models demo --models-dir "$ROOT/models" >/dev/null
}
