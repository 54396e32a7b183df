"""The loop `docker compose up` shows, run for real without Docker: Orthanc (Debian's package)
with deploy/compose/orthanc.json and autoroute.lua, `pneumo serve` with deploy/compose/pneumo.toml
on PostgreSQL. Only what a container network changes is rewritten (addresses to loopback, ports to
free ones, directories to tmp); every key that makes the loop work is the shipped file's.

A modality stores the example radiograph into Orthanc; Orthanc's Lua script forwards it to the
gateway; the gateway's SR and summary image come back into Orthanc. Also: `pneumo health` (the
image's HEALTHCHECK) against that gateway, and over HTTPS with [fhir.tls] on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pynetdicom import AE

from tests.conftest import wait_until
from tests.deploy import compose_checks as cc
from tests.dicom_peers import ORTHANC_BINARY, _stop, free_port, wait_for_port
from tests.gateway.serve_process import ServeProcess

ROOT = cc.ROOT
EXAMPLE = ROOT / "examples" / "paediatric-cxr-example.dcm"
ORTHANC_GATEWAY_ADDRESS = "172.28.0.20"


def _replace_once(text: str, old: str, new: str, count: int = 1) -> str:
    assert text.count(old) == count, f"{old!r} appears {text.count(old)} times in the compose pneumo.toml"
    return text.replace(old, new)


def _gateway_config(tmp_path: Path, dicom_port: int, http_port: int, orthanc_port: int, extra: str = "") -> Path:
    text = (ROOT / "deploy/compose/pneumo.toml").read_text()
    text = _replace_once(text, 'data_dir = "/var/lib/pneumo"', f'data_dir = "{tmp_path / "pneumo"}"')
    text = _replace_once(text, 'bind = "0.0.0.0"', 'bind = "127.0.0.1"', count=3)
    text = _replace_once(text, f'host = "{ORTHANC_GATEWAY_ADDRESS}"', 'host = "127.0.0.1"')
    text = _replace_once(text, 'host = "orthanc"', 'host = "127.0.0.1"')
    text = _replace_once(text, "port = 4242", f"port = {orthanc_port}", count=2)
    text = _replace_once(text, "port = 11112", f"port = {dicom_port}")
    text = _replace_once(text, "port = 8080", f"port = {http_port}")
    text = _replace_once(text, "port = 2575", "port = 0")
    path = tmp_path / "pneumo.toml"
    path.write_text(text + extra)
    return path


def _gateway_env(monkeypatch: pytest.MonkeyPatch, database_url: str) -> None:
    """The gateway service's environment from docker-compose.yml, the database made the test's."""
    for key in [k for k in os.environ if k.startswith("PNEUMO_")]:
        monkeypatch.delenv(key)
    env = cc.environment(cc.load_compose(ROOT / "docker-compose.yml")["services"]["gateway"])
    for key, value in env.items():
        if key != "PNEUMO_CONFIG":
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("PNEUMO_DATABASE_URL", database_url)


class ComposeOrthanc:
    """Orthanc run with the compose configuration file (ports, directories, the gateway's address changed)."""

    def __init__(self, tmp_path: Path, gateway_port: int) -> None:
        if not Path(ORTHANC_BINARY).is_file():
            pytest.skip("Orthanc not installed (apt-get install orthanc)")
        config: dict[str, Any] = json.loads((ROOT / "deploy/compose/orthanc.json").read_text())
        self.user, self.password = next(iter(config["RegisteredUsers"].items()))
        self.dicom_port, self.http_port = free_port(), free_port()
        lua = cc.mounted(cc.load_compose(ROOT / "docker-compose.yml")["services"]["orthanc"], config["LuaScripts"][0], ROOT)
        assert lua is not None and lua.is_file()
        config.update({
            "StorageDirectory": str(tmp_path / "orthanc-db"), "IndexDirectory": str(tmp_path / "orthanc-db"),
            "DicomPort": self.dicom_port, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "LuaScripts": [str(lua)],
        })
        config["DicomModalities"]["pneumo"].update({"Host": "127.0.0.1", "Port": gateway_port})
        self.ae_title = config["DicomAet"]
        self.config_path = tmp_path / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = tmp_path / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ComposeOrthanc:
        with self.log_path.open("wb") as log:
            command = [ORTHANC_BINARY, "--verbose", str(self.config_path)]
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.http_port, self.proc)
        wait_for_port(self.dicom_port, self.proc)
        return self

    def series_modalities(self) -> list[str]:
        response = httpx.get(f"http://127.0.0.1:{self.http_port}/series", params={"expand": ""},
                             auth=(self.user, self.password), timeout=10)
        response.raise_for_status()
        return sorted(str(s["MainDicomTags"].get("Modality")) for s in response.json())


def _pneumo(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_modality_orthanc_gateway_orthanc(tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dicom_port, http_port = free_port(), free_port()
    orthanc = ComposeOrthanc(tmp_path, dicom_port).start()
    serve: ServeProcess | None = None
    try:
        log = orthanc.log_path.read_text(errors="replace")
        assert "autoroute.lua" in log and "Lua" in log, "Orthanc did not load the Lua script"
        config = _gateway_config(tmp_path, dicom_port, http_port, orthanc.dicom_port)
        _gateway_env(monkeypatch, postgres_url)
        serve = ServeProcess(config, tmp_path / "serve.log").start(timeout=120)

        health = _pneumo(config, "health")
        assert health.returncode == 0 and json.loads(health.stdout)["ok"] is True, health.stdout + health.stderr

        # The modality: the example radiograph into the PACS.
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1")  # CR Image Storage
        association = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.ae_title)
        assert association.is_established
        status = association.send_c_store(dcmread(EXAMPLE))
        association.release()
        assert status.Status == 0x0000

        # Orthanc forwarded it (Lua), the gateway classified it and sent its SR and summary image back.
        def with_reports() -> list[str] | None:
            modalities = orthanc.series_modalities()
            return modalities if "SR" in modalities and len(modalities) >= 3 else None

        modalities = wait_until(with_reports, timeout=180, what=f"the gateway's SR and summary image in Orthanc ({tmp_path})")
        assert "CR" in modalities and "SR" in modalities, modalities
        instances = [json.loads(line) for line in _pneumo(config, "instances", "--json").stdout.splitlines()]
        assert any(i["calling_ae"] == orthanc.ae_title and i["outcome"] == "ok" for i in instances), instances
    finally:
        if serve is not None:
            serve.kill()
        _stop(orthanc.proc)
    assert _pneumo(config, "health", "--timeout", "2").returncode == 1


def test_health_over_https(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With [fhir.tls] (mutual TLS even) the image's HEALTHCHECK still works: https, our CA."""
    for key in [k for k in os.environ if k.startswith("PNEUMO_")]:
        monkeypatch.delenv(key)
    certs = tmp_path / "certs"
    made = subprocess.run([sys.executable, "-m", "gateway.cli", "certs", "dev", "--dir", str(certs)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    http_port = free_port()
    config = tmp_path / "pneumo.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "var"}"\n[dicom]\nbind = "127.0.0.1"\nport = 0\n[hl7]\nenabled = false\n'
        f'[worker]\nenabled = false\n[fhir]\nbind = "127.0.0.1"\nport = {http_port}\n[fhir.auth]\nmode = "anonymous"\n'
        f'[fhir.tls]\ncert_file = "{certs / "server.pem"}"\nkey_file = "{certs / "server.key"}"\n'
        f'ca_file = "{certs / "ca.pem"}"\nrequire_client_cert = true\n'
    )
    serve = ServeProcess(config, tmp_path / "serve.log").start(timeout=120)
    try:
        health = _pneumo(config, "health")
        assert health.returncode == 0, health.stdout + health.stderr
        assert json.loads(health.stdout) == {"url": f"https://127.0.0.1:{http_port}/health", "ok": True}
        # The plain-http probe the image used to have fails against this listener: the reason for `pneumo health`.
        plain = config.with_name("plain.toml")
        plain.write_text(config.read_text().split("[fhir.tls]")[0])
        assert _pneumo(plain, "health", "--timeout", "3").returncode == 1
    finally:
        serve.kill()
