"""``pneumo certs dev`` through the installed console script: the files, their modes, the
settings lines it prints, and that it never replaces an existing key unasked."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from tests.gateway.test_cli_first_hour import run_pneumo


def test_certs_dev_writes_a_usable_pki_and_prints_the_settings(tmp_path: Path) -> None:
    result = run_pneumo("certs", "dev", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    certs = tmp_path / "var" / "certs"
    assert sorted(p.name for p in certs.iterdir()) == [
        "ca.key", "ca.pem", "client.key", "client.pem", "server.key", "server.pem"
    ]
    assert all((certs / name).stat().st_mode & 0o777 == 0o600 for name in ("ca.key", "server.key", "client.key"))
    settings_lines = tomllib.loads("\n".join(line for line in result.stdout.splitlines() if not line.startswith("#")))
    assert Path(settings_lines["cert_file"]).name == "server.pem" and Path(settings_lines["ca_file"]).name == "ca.pem"
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(certs / "ca.pem"), str(certs / "server.pem"), str(certs / "client.pem")],
        capture_output=True, text=True, check=False,
    )
    assert verified.returncode == 0, verified.stdout

    key_before = (certs / "server.key").read_bytes()
    again = run_pneumo("certs", "dev", cwd=tmp_path)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert (certs / "server.key").read_bytes() == key_before
