"""Offline checks of the container deployment (Dockerfile, .dockerignore, docker-compose.yml,
deploy/compose/*) against the code: no Docker engine runs on our machines, so what ``docker
compose up`` would discover late (a missing file, a port the gateway does not listen on, a
``PNEUMO_*`` variable that sets nothing, AE titles that do not agree, a command ``pneumo`` does
not have) is found here.

Every check is a function of already-parsed data that returns a list of problems (empty: fine),
so that the tests can run each one on the real files and on a deliberately broken copy.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from conf.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
#: Read by the CLI, not a setting (gateway/cli_help.py default_config).
CLI_VARIABLES = {"PNEUMO_CONFIG"}
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile that the checks need (continuation lines joined)."""

    instructions: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        joined = re.sub(r"\\\n", " ", text)
        parsed = cls()
        for line in joined.splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            keyword, _, rest = stripped.partition(" ")
            parsed.instructions.append((keyword.upper(), rest.strip()))
        return parsed

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def final_stage(self) -> list[tuple[str, str]]:
        starts = [i for i, (kw, _) in enumerate(self.instructions) if kw == "FROM"]
        return self.instructions[starts[-1]:] if starts else []

    def env(self) -> dict[str, str]:
        """ENV of every stage, ``KEY=VALUE`` form (the only form this project uses)."""
        result: dict[str, str] = {}
        for rest in self.all("ENV"):
            for token in shlex.split(rest):
                key, sep, value = token.partition("=")
                if sep:
                    result[key] = value
        return result


def exec_form(value: str) -> list[str] | None:
    """A JSON-array (exec form) instruction argument, or None for shell form."""
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return [str(item) for item in parsed] if isinstance(parsed, list) else None


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with the default (what a clean checkout runs with)."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def load_compose(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def dockerignore_patterns(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _ignored(relative: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        if fnmatch.fnmatch(relative, pattern) or relative == bare or relative.startswith(bare + "/"):
            return True
    return False


# ------------------------------------------------------------------------------------- checks


def check_dockerfile_shape(dockerfile: Dockerfile) -> list[str]:
    """Multi-stage, non-root numeric USER in the final stage, lock file used, HEALTHCHECK via
    ``pneumo health``, model verified at build time."""
    problems = []
    if len(dockerfile.all("FROM")) < 2:
        problems.append("not multi-stage (one FROM)")
    if not all("slim" in base for base in dockerfile.all("FROM")):
        problems.append("a base image is not a slim one")
    users = [rest for kw, rest in dockerfile.final_stage() if kw == "USER"]
    if not users or users[-1].split(":")[0] in {"root", "0"}:
        problems.append("the final stage does not switch to a non-root USER")
    elif not users[-1].split(":")[0].isdigit():
        problems.append("USER is not numeric (Kubernetes runAsNonRoot cannot check a name)")
    if not any("constraints.txt" in rest and ("-c " in rest or "--constraint" in rest) for rest in dockerfile.all("RUN")):
        problems.append("no RUN installs with the lock file (pip --constraint constraints.txt)")
    if not any("pneumo model info" in rest for rest in dockerfile.all("RUN")):
        problems.append("the bundled model is not verified at build time (pneumo model info)")
    health = dockerfile.all("HEALTHCHECK")
    if len(health) != 1 or "CMD" not in health[0]:
        problems.append("no HEALTHCHECK CMD")
    return problems


def check_dockerfile_copies(dockerfile: Dockerfile, context: Path, ignore: list[str]) -> list[str]:
    """Every COPY source exists in the build context and is not excluded by .dockerignore."""
    problems = []
    for rest in dockerfile.all("COPY"):
        if rest.startswith("--from"):
            continue
        *sources, _target = rest.split()
        for source in sources:
            if source.startswith("--"):
                continue
            if not (context / source).exists():
                problems.append(f"COPY {source}: not in the build context")
            elif _ignored(source, ignore):
                problems.append(f"COPY {source}: excluded by .dockerignore")
    return problems


def package_data_reaches_image(pyproject: dict[str, Any], model_dir: Path, root: Path) -> list[str]:
    """The bundled model's files are package data (so the wheel, hence the image, has them)."""
    patterns = [p for globs in pyproject["tool"]["setuptools"]["package-data"].values() for p in globs]
    problems = []
    for name in ("model.json", "model.onnx"):
        if not (model_dir / name).is_file():
            problems.append(f"{model_dir / name}: missing")
        elif not any(fnmatch.fnmatch(name, p) for p in patterns):
            problems.append(f"{name}: not matched by [tool.setuptools.package-data] {patterns}")
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    top = model_dir.relative_to(root).parts[0]
    if not any(fnmatch.fnmatch(top, p) for p in includes):
        problems.append(f"package {top} not in [tool.setuptools.packages.find] include")
    return problems


def check_commands(argvs: dict[str, list[str]]) -> list[str]:
    """Each ``pneumo`` command line parses with the real CLI parser (gateway.cli.build_parser)."""
    from gateway.cli import build_parser

    problems = []
    for where, argv in argvs.items():
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            problems.append(f"{where}: `pneumo {' '.join(argv)}` is not a pneumo command")
    return problems


def _field_model(model: type[BaseModel], name: str) -> tuple[bool, type[BaseModel] | None]:
    fields = model.model_fields
    if name not in fields:
        return False, None
    annotation = fields[name].annotation
    nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return True, nested


def check_env_names(names: dict[str, str]) -> list[str]:
    """Each ``PNEUMO_*`` variable names a real setting: PNEUMO_A__B__C walks Settings.a.b.c."""
    problems = []
    for name, where in names.items():
        if not name.startswith("PNEUMO_") or name in CLI_VARIABLES:
            continue
        model: type[BaseModel] | None = Settings
        path = name.removeprefix("PNEUMO_").lower().split("__")
        for depth, part in enumerate(path):
            found, nested = _field_model(model, part) if model is not None else (False, None)
            if not found or (nested is None and depth < len(path) - 1):
                problems.append(f"{where}: {name} sets no setting (no {'.'.join(path[: depth + 1])})")
                break
            model = nested
    return problems


def settings_with(toml: Path, env: dict[str, str], monkeypatch: Any) -> Settings:
    """The Settings the container builds: the mounted file plus its PNEUMO_* environment."""
    for key in [k for k in os.environ if k.startswith("PNEUMO_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("PNEUMO_") and key not in CLI_VARIABLES:
            monkeypatch.setenv(key, value)
    return load_settings(toml)


def check_gateway_ports(service: dict[str, Any], exposed: list[int], settings: Settings) -> list[str]:
    """Published container ports and EXPOSE are exactly the ports the gateway listens on."""
    listening = {settings.dicom.port, settings.fhir.port, *([settings.hl7.port] if settings.hl7.enabled else [])}
    published = {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}
    problems = []
    if published != listening:
        problems.append(f"compose publishes container ports {sorted(published)}, the gateway listens on {sorted(listening)}")
    if set(exposed) != listening:
        problems.append(f"Dockerfile EXPOSE {sorted(exposed)}, the gateway listens on {sorted(listening)}")
    for name, bind in (("dicom", settings.dicom.bind), ("fhir", settings.fhir.bind), ("hl7", settings.hl7.bind)):
        if bind not in {"0.0.0.0", "::"}:
            problems.append(f"[{name}] bind {bind!r}: unreachable from other containers")
    return problems


def check_volume_sources(compose: dict[str, Any], root: Path) -> list[str]:
    """Every bind-mounted host path exists; every named volume is declared; build contexts exist."""
    problems = []
    declared = set((compose.get("volumes") or {}).keys())
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            context = root / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            if not (context / dockerfile).is_file():
                problems.append(f"{name}: build {context / dockerfile} missing")
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                if not (root / source).exists():
                    problems.append(f"{name}: mounts {source}, which does not exist")
            elif source not in declared:
                problems.append(f"{name}: named volume {source} not declared under volumes:")
        problems.extend(_command_files(name, service, root))
    return problems


def _command_files(name: str, service: dict[str, Any], root: Path) -> list[str]:
    """A command argument that is a path inside a bind mount (the modality's example file) exists."""
    problems = []
    binds = [str(v).split(":")[:2] for v in service.get("volumes", []) if str(v).startswith((".", "/"))]
    for arg in [str(a) for a in service.get("command") or []]:
        for source, target in binds:
            if arg.startswith(target.rstrip("/") + "/") and not (root / source / arg[len(target):].lstrip("/")).exists():
                problems.append(f"{name}: command names {arg}, which is not in the mounted {source}")
    return problems


def mounted(service: dict[str, Any], target: str, root: Path) -> Path | None:
    """The host file a service mounts at *target*."""
    for volume in service.get("volumes", []):
        parts = str(volume).split(":")
        if len(parts) >= 2 and parts[1] == target:
            return root / parts[0]
    return None


def check_orthanc_agrees(compose: dict[str, Any], orthanc: dict[str, Any], lua: str, settings: Settings,
                         gateway_service: str, orthanc_service: str) -> list[str]:
    """Orthanc and the gateway name each other the same way: AE titles, hosts, ports, the Lua
    script's modality, the fixed address the gateway's peer entry allows."""
    problems = []
    orthanc_svc = compose["services"][orthanc_service]
    ae = orthanc.get("DicomAet")
    port = orthanc.get("DicomPort", 4242)
    peers = [p for p in settings.dicom.peers if p.ae_title == ae]
    if not peers:
        problems.append(f"Orthanc's DicomAet {ae!r} is no [[dicom.peers]] ae_title of the gateway")
    elif "store" not in peers[0].permissions:
        problems.append(f"[[dicom.peers]] {ae}: no 'store' permission, Orthanc cannot push")
    addresses = {net.get("ipv4_address") for net in (orthanc_svc.get("networks") or {}).values()
                 if isinstance(net, dict)} if isinstance(orthanc_svc.get("networks"), dict) else set()
    if peers and peers[0].host is not None and peers[0].host not in addresses:
        fixed = sorted(map(str, addresses))
        problems.append(f"[[dicom.peers]] {ae} host {peers[0].host!r} is not Orthanc's fixed address {fixed}")
    destinations = [d for d in settings.dicom.destinations if d.ae_title == ae]
    if not destinations:
        problems.append(f"no [[dicom.destinations]] with Orthanc's AE title {ae!r}: SR/SC would not go back")
    for d in destinations:
        if d.host != orthanc_service or d.port != port:
            problems.append(f"[[dicom.destinations]] {d.name}: {d.host}:{d.port}, Orthanc is {orthanc_service}:{port}")
    published = {int(str(p).split(":")[-1]) for p in orthanc_svc.get("ports", [])}
    if port not in published:
        problems.append(f"Orthanc DicomPort {port} not published (modalities push there)")
    modalities = orthanc.get("DicomModalities", {})
    routed = re.findall(r"SendToModality\([^,]+,\s*(\w+)\)", lua)
    names = set(re.findall(r"local\s+(\w+)\s*=\s*'([^']*)'", lua))
    constants = dict(names)
    targets = [constants.get(r, r.strip("'\"")) for r in routed]
    if not targets:
        problems.append("the Lua script sends nothing (no SendToModality)")
    for target in targets:
        entry = modalities.get(target)
        if entry is None:
            problems.append(f"Lua SendToModality({target!r}): no such DicomModalities entry")
            continue
        aet, host, mport = (entry["AET"], entry["Host"], entry["Port"]) if isinstance(entry, dict) else entry
        if aet != settings.dicom.ae_title:
            problems.append(f"DicomModalities {target}: AET {aet!r}, the gateway is {settings.dicom.ae_title!r}")
        if host != gateway_service:
            problems.append(f"DicomModalities {target}: host {host!r}, the gateway service is {gateway_service!r}")
        if int(mport) != settings.dicom.port:
            problems.append(f"DicomModalities {target}: port {mport}, the gateway listens on {settings.dicom.port}")
    if "GATEWAY_AE" in constants and constants["GATEWAY_AE"] != settings.dicom.ae_title:
        problems.append(f"Lua GATEWAY_AE {constants['GATEWAY_AE']!r} is not the gateway's AE title (loop guard)")
    for script in orthanc.get("LuaScripts", []):
        if mounted(orthanc_svc, script, ROOT) is None:
            problems.append(f"LuaScripts {script}: not mounted into the Orthanc container")
    return problems


def check_dependencies(compose: dict[str, Any]) -> list[str]:
    """PostgreSQL has a healthcheck and the gateway waits for it; depends_on names real services."""
    problems = []
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for other in depends:
            if other not in services:
                problems.append(f"{name}: depends on unknown service {other}")
            elif isinstance(depends, dict) and depends[other].get("condition") == "service_healthy":
                image_health = other == "gateway"  # the image's HEALTHCHECK (Dockerfile)
                if "healthcheck" not in services[other] and not image_health:
                    problems.append(f"{name}: waits for {other} to be healthy, which has no healthcheck")
    postgres = [n for n, s in services.items() if str(s.get("image", "")).startswith("postgres")]
    if not postgres or "healthcheck" not in services[postgres[0]]:
        problems.append("no PostgreSQL service with a healthcheck")
    return problems


def check_database(compose: dict[str, Any], settings: Settings, postgres_service: str) -> list[str]:
    """The gateway's database URL points at the PostgreSQL service with its user, password, db."""
    from sqlalchemy.engine import make_url

    env = environment(compose["services"][postgres_service])
    url = make_url(settings.effective_database_url)
    problems = []
    if not url.drivername.startswith("postgresql"):
        problems.append(f"the gateway's database is {url.drivername}, not the PostgreSQL service")
        return problems
    expected = (postgres_service, env.get("POSTGRES_USER"), env.get("POSTGRES_PASSWORD"), env.get("POSTGRES_DB"))
    if (url.host, url.username, url.password, url.database) != expected:
        problems.append(f"database URL {url.host}/{url.username}/{url.database} does not match the {postgres_service} service")
    return problems
