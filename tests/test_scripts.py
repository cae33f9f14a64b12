"""The shell scripts: they parse, and setup_pi's checks tell a ready Pi from a machine that is not."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["demo", "test", "setup_pi", "mosquitto_users", "bench_llm", "bench_mqtt", "bench_http",
           "bench_recovery", "bench_sampling", "bench_console",
           "bench_eta", "bench_moderation", "bench_persona", "lib/setup.sh"]


def test_every_script_parses() -> None:
    for name in SCRIPTS:
        done = subprocess.run(["bash", "-n", str(ROOT / "scripts" / name)], capture_output=True, text=True)
        assert done.returncode == 0, (name, done.stderr)


def setup_pi_check(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "scripts/setup_pi"), "--check"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def test_setup_pi_check_explains_what_a_machine_lacks(tmp_path: Path) -> None:
    done = setup_pi_check(tmp_path, {"SETUP_PI_BOOT_CONFIG": str(tmp_path / "none.txt"),
                                     "SETUP_PI_AXCL_LIB": str(tmp_path / "none")})
    assert done.returncode == 1
    assert "FIX   the PCIe connector is not enabled" in done.stdout and "dtparam=pciex1" in done.stdout
    assert "the AXCL runtime is not installed" in done.stdout
    assert "axcl-smi does not list an AX650 card" in done.stdout


def test_setup_pi_check_passes_on_a_ready_pi(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "uname": "#!/bin/sh\necho aarch64\n",
        "lspci": "#!/bin/sh\necho '0001:01:00.0 Multimedia video controller: Axera Semiconductor Co., Ltd'\n",
        "axcl-smi": f"#!/bin/sh\nexec {ROOT / 'tests/fake_axcl_smi.py'} \"$@\"\n",
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    boot = tmp_path / "config.txt"
    boot.write_text("[all]\ndtparam=pciex1\ndtparam=pciex1_gen=3\n")
    lib = tmp_path / "axcl"
    lib.mkdir()
    (lib / "libaxcl_rt.so").write_bytes(b"")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SETUP_PI_BOOT_CONFIG": str(boot),
           "SETUP_PI_AXCL_LIB": str(lib), "FAKE_SMI_MODE": "ok"}
    done = setup_pi_check(tmp_path, env)
    assert done.returncode == 0, done.stdout
    assert "FIX" not in done.stdout and done.stdout.count("  ok    ") == 5
