"""Offline checks of the Kubernetes manifests (deploy/k8s) against the Kubernetes schemas and the code.

No cluster runs on our machines, so what ``kubectl apply`` or the first pod start would discover
(a field the API server rejects, a container port the gateway does not listen on, a probe path
the app does not serve, a ``PNEUMO_*`` variable that sets nothing, a key file a setting names but
no volume mounts) is found here. Like tests/deploy/compose_checks.py, every check is a function of
already-parsed data returning a list of problems (empty: fine), so the tests run each one on the
real manifests and on a deliberately broken copy.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import yaml
from pydantic import BaseModel

from conf.settings import Settings
from tests.deploy.compose_checks import ROOT, check_commands, check_env_names

K8S_DIR = ROOT / "deploy" / "k8s"
SECRETS_EXAMPLE = K8S_DIR / "secrets.example.yaml"
#: The oldest Kubernetes minor the manifests promise to work on (README) and the newest schema we have.
OLDEST_VERSION = "1.30.0"
NEWEST_VERSION: str = kubernetes_validate.utils.latest_version()
#: Path settings that are not files handed to the pod: data on the volume, or the bundled model.
_NOT_MOUNTED_FILES = {"data_dir", "audit.anchor_file", "audit.syslog.cursor_file", "inference.model_dir"}
_CLUSTER_SCOPED = {"Namespace"}
#: Which listener each container port name of the gateway must be.
_PORT_SETTINGS = {"dicom": "dicom", "https": "fhir", "http": "fhir", "mllp": "hl7"}


@dataclass
class Manifests:
    """Every object of the kustomization's resources plus the example Secrets."""

    documents: list[dict[str, Any]]
    kustomization: dict[str, Any]
    secrets: list[dict[str, Any]]

    @classmethod
    def load(cls, directory: Path = K8S_DIR) -> Manifests:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        documents: list[dict[str, Any]] = []
        for resource in kustomization.get("resources", []):
            documents.extend(load_yaml_documents(directory / resource))
        secrets = load_yaml_documents(directory / SECRETS_EXAMPLE.name)
        return cls(documents, kustomization, secrets)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.documents if d["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        matches = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        if len(matches) != 1:
            raise LookupError(f"{kind}/{name}: {len(matches)} found")
        return matches[0]


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def pneumo_toml(configmap: dict[str, Any]) -> str:
    text: str = configmap["data"]["pneumo.toml"]
    return text


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return found


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's env with literal values (secretKeyRef ones as a placeholder)."""
    return {e["name"]: str(e.get("value", "<from a Secret>")) for e in container.get("env", [])}


# ------------------------------------------------------------------------------------- checks


def check_schemas(documents: list[dict[str, Any]], version: str) -> list[str]:
    """Each object against the Kubernetes JSON schema of *version*, strict (no unknown fields)."""
    problems = []
    for document in documents:
        where = f"{document.get('kind')}/{(document.get('metadata') or {}).get('name')}"
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.absolute_path)
            problems.append(f"{where} ({version}): {exc.message} at {path or '<root>'}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{where} ({version}): {exc}")
    return problems


def check_kustomization(kustomization: dict[str, Any], directory: Path, documents: list[dict[str, Any]]) -> list[str]:
    """Every resource exists, every manifest file is listed (`apply -f manifests/` and `apply -k`
    give the same objects), the example Secrets are not (they would overwrite the real ones), and
    every namespaced object sits in the kustomization's namespace (so `apply -f` agrees too)."""
    problems = []
    listed = {str(r) for r in kustomization.get("resources", [])}
    for resource in sorted(listed):
        if not (directory / resource).is_file():
            problems.append(f"kustomization resource {resource} does not exist")
    for path in sorted((directory / "manifests").glob("*.y*ml")):
        if str(path.relative_to(directory)) not in listed:
            problems.append(f"{path.relative_to(directory)} is not in kustomization.yaml resources")
    if any(SECRETS_EXAMPLE.name in r for r in listed):
        problems.append("kustomization lists the example Secrets: applying it would overwrite the real ones")
    namespace = kustomization.get("namespace")
    for document in documents:
        name = f"{document['kind']}/{document['metadata']['name']}"
        if document["kind"] in _CLUSTER_SCOPED:
            if document["metadata"]["name"] != namespace:
                problems.append(f"{name}: not the kustomization namespace {namespace!r}")
        elif document["metadata"].get("namespace") != namespace:
            problems.append(f"{name}: namespace {document['metadata'].get('namespace')!r}, not {namespace!r}")
    images = {i["name"] for i in kustomization.get("images", [])}
    for deployment in [d for d in documents if d["kind"] == "Deployment"]:
        for container in containers(deployment):
            if container["image"].rsplit(":", 1)[0] not in images:
                problems.append(f"{deployment['metadata']['name']}: image {container['image']} not under kustomization images")
    return problems


def check_commands_are_pneumo(deployments: dict[str, dict[str, Any]], expected: dict[str, str]) -> list[str]:
    """Each container runs `pneumo <expected sub-command>`, and that command line parses with the
    real CLI parser (gateway.cli.build_parser)."""
    problems = []
    argvs: dict[str, list[str]] = {}
    for name, deployment in deployments.items():
        for container in containers(deployment):
            command = [*container.get("command", []), *container.get("args", [])]
            if command[:1] != ["pneumo"]:
                problems.append(f"{name}: runs {command[:1]}, not pneumo")
                continue
            argvs[name] = command[1:]
            if command[1:2] != [expected[name]]:
                problems.append(f"{name}: runs `pneumo {' '.join(command[1:])}`, expected `pneumo {expected[name]}`")
    return problems + check_commands(argvs)


def check_env(deployments: dict[str, dict[str, Any]]) -> list[str]:
    """Every PNEUMO_* variable of every container names a real setting."""
    names = {e["name"]: f"{name}/{c['name']}" for name, d in deployments.items() for c in containers(d)
             for e in c.get("env", [])}
    unset = [f"{where}: {n} is not a PNEUMO_* variable" for n, where in names.items() if not n.startswith("PNEUMO_")]
    return unset + check_env_names(names)


def check_gateway_listeners(gateway: dict[str, Any], settings: Settings) -> list[str]:
    """The gateway's container ports are exactly its listeners (named dicom, https/http, mllp),
    on every interface, and it runs no job workers (they are the worker Deployment's)."""
    problems = []
    (container,) = containers(gateway)
    declared = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    listening = {"dicom": settings.dicom.port, "fhir": settings.fhir.port}
    if settings.hl7.enabled:
        listening["hl7"] = settings.hl7.port
    seen = set()
    for name, port in declared.items():
        section = _PORT_SETTINGS.get(name)
        if section is None:
            problems.append(f"container port {name}: not a gateway listener")
            continue
        seen.add(section)
        if listening.get(section) != port:
            problems.append(f"container port {name} {port}: [{section}] port is {listening.get(section)}")
    for section in sorted(set(listening) - seen):
        problems.append(f"[{section}] port {listening[section]}: no container port")
    if "http" in declared and settings.fhir.tls.enabled:
        problems.append("container port named http but [fhir.tls] is on: name it https")
    for section in ("dicom", "fhir", "hl7"):
        bind = getattr(settings, section).bind
        if bind not in {"0.0.0.0", "::"}:
            problems.append(f"[{section}] bind {bind!r}: unreachable through a Service")
    if settings.worker.enabled and settings.worker.processes > 0:
        problems.append(f"the gateway pod would start {settings.worker.processes} worker processes: "
                        "[worker] enabled = false (workers are the pneumo-worker Deployment)")
    return problems


def _port_number(container: dict[str, Any], port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    return None


def check_probes(gateway: dict[str, Any], settings: Settings, app_paths: set[str]) -> list[str]:
    """Liveness on /health, readiness on /ready, both paths served by gateway/http.py's app, on the
    HTTP port, scheme HTTPS exactly when [fhir.tls] is on, and no HTTP probe against a listener
    that demands a client certificate (the kubelet has none)."""
    problems = []
    (container,) = containers(gateway)
    expected = {"livenessProbe": "/health", "readinessProbe": "/ready", "startupProbe": "/health"}
    for kind in ("livenessProbe", "readinessProbe"):
        if kind not in container:
            problems.append(f"no {kind}")
    scheme = "HTTPS" if settings.fhir.tls.enabled else "HTTP"
    for kind, path in expected.items():
        probe = container.get(kind)
        if probe is None:
            continue
        get = probe.get("httpGet")
        if get is None:
            problems.append(f"{kind}: not an httpGet probe")
            continue
        if get.get("path") != path:
            problems.append(f"{kind}: path {get.get('path')!r}, expected {path}")
        if get.get("path") not in app_paths:
            problems.append(f"{kind}: {get.get('path')!r} is not a route of gateway/http.py's app")
        if _port_number(container, get.get("port", "")) != settings.fhir.port:
            problems.append(f"{kind}: port {get.get('port')!r} is not [fhir] port {settings.fhir.port}")
        if get.get("scheme", "HTTP") != scheme:
            problems.append(f"{kind}: scheme {get.get('scheme', 'HTTP')}, but the port speaks {scheme} ([fhir.tls])")
        if settings.fhir.tls.require_client_cert:
            problems.append(f"{kind}: [fhir.tls] require_client_cert refuses the kubelet's probe (no client certificate)")
    return problems


def check_services(services: list[dict[str, Any]], deployments: list[dict[str, Any]], settings: Settings) -> list[str]:
    """Each Service selects pods of a Deployment and targets ports those pods declare; the DICOM
    and MLLP Service keeps client source addresses when the peers are checked by host."""
    problems = []
    for service in services:
        name = service["metadata"]["name"]
        spec = service["spec"]
        if spec.get("type") == "ExternalName":
            continue
        selector = spec.get("selector") or {}
        pods = [d for d in deployments if selector and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        if not pods:
            problems.append(f"Service {name}: selector {selector} matches no Deployment's pods")
            continue
        for port in spec.get("ports", []):
            target = port.get("targetPort", port["port"])
            for pod in pods:
                if all(_port_number(c, target) is None for c in containers(pod)):
                    problems.append(f"Service {name}: targetPort {target!r} is no container port of {pod['metadata']['name']}")
        numbers = {_port_number(c, p.get("targetPort", p["port"]))
                   for p in spec.get("ports", []) for d in pods for c in containers(d)}
        checked_by_host = any(p.host for p in settings.dicom.peers) or any(p.host for p in settings.hl7.peers)
        takes_peers = settings.dicom.port in numbers or settings.hl7.port in numbers
        if takes_peers and checked_by_host and spec.get("type") in {"LoadBalancer", "NodePort"} \
                and spec.get("externalTrafficPolicy") != "Local":
            problems.append(f"Service {name}: peers are checked by source address, but externalTrafficPolicy is not Local")
    return problems


def mounted_files(settings: Settings) -> dict[str, Path]:
    """Files the settings name that the pod must be given (keys, certificates, the JWK Set):
    every Path-valued setting but the data directory and what lives in it."""
    found: dict[str, Path] = {}

    def walk(model: BaseModel, prefix: str) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            key = f"{prefix}{name}"
            if key in _NOT_MOUNTED_FILES:
                continue
            if isinstance(value, BaseModel):
                walk(value, key + ".")
            elif isinstance(value, Path):
                found[key] = value
            elif isinstance(value, list):
                found.update({f"{key}[{i}]": v for i, v in enumerate(value) if isinstance(v, Path)})
            elif isinstance(value, dict):
                found.update({f"{key}[{k}]": v for k, v in value.items() if isinstance(v, Path)})

    walk(settings, "")
    return found


def _volume_files(pod: dict[str, Any], container: dict[str, Any]) -> Iterator[tuple[PurePosixPath, dict[str, Any], str | None]]:
    """(path in the container, volume, key) of each file a Secret or ConfigMap volume projects."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        source = volume.get("secret") or volume.get("configMap")
        if source is None:
            continue
        for item in source.get("items", []):
            yield PurePosixPath(mount["mountPath"]) / item["path"], volume, item["key"]


def _covering_mount(container: dict[str, Any], path: PurePosixPath) -> dict[str, Any] | None:
    mounts = [m for m in container.get("volumeMounts", []) if path.is_relative_to(m["mountPath"])]
    return max(mounts, key=lambda m: len(m["mountPath"]), default=None)


def check_mounted_files(deployment: dict[str, Any], settings: Settings, secrets: list[dict[str, Any]]) -> list[str]:
    """Both directions: every file a setting names is projected into the container by a Secret
    or ConfigMap item whose key the example Secret has; every projected Secret file is named by a
    setting (a mounted key nobody reads is a key in the wrong place)."""
    problems = []
    name = deployment["metadata"]["name"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = containers(deployment)
    projected = {path: (volume, key) for path, volume, key in _volume_files(pod, container)}
    example_keys = {s["metadata"]["name"]: set((s.get("stringData") or {}) | (s.get("data") or {})) for s in secrets}
    wanted = mounted_files(settings)
    for setting, file in wanted.items():
        path = PurePosixPath(file)
        if path not in projected:
            mount = _covering_mount(container, path)
            how = f"volume {mount['name']} has no item {path.name}" if mount else "no volume is mounted there"
            problems.append(f"{name}: {setting} = {file}: {how}")
            continue
        volume, key = projected[path]
        secret = volume.get("secret")
        if secret is not None and key not in example_keys.get(secret["secretName"], set()):
            problems.append(f"{name}: {setting} comes from Secret {secret['secretName']} key {key}, "
                            "which secrets.example.yaml does not have")
    named = {PurePosixPath(f) for f in wanted.values()}
    for path, (volume, _key) in projected.items():
        if "secret" in volume and path not in named:
            problems.append(f"{name}: mounts secret file {path}, which no setting names")
    for env in container.get("env", []):
        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
        if ref and ref["key"] not in example_keys.get(ref["name"], set()):
            problems.append(f"{name}: {env['name']} from Secret {ref['name']} key {ref['key']}, not in secrets.example.yaml")
    return problems


def check_pod_security(deployment: dict[str, Any], settings: Settings, image_uid: int) -> list[str]:
    """Non-root as the image's numeric USER, no privilege escalation, every capability dropped,
    read-only root file system with the places pneumo writes mounted writable: data_dir from the
    shared claim, the run/ folder of its wake-up registrations (per host) from a per-pod emptyDir, /tmp."""
    problems = []
    name = deployment["metadata"]["name"]
    pod = deployment["spec"]["template"]["spec"]
    pod_context = pod.get("securityContext", {})
    if pod_context.get("runAsNonRoot") is not True:
        problems.append(f"{name}: runAsNonRoot is not true")
    if pod_context.get("runAsUser") != image_uid:
        problems.append(f"{name}: runAsUser {pod_context.get('runAsUser')}, the image's USER is {image_uid}")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: mounts a service account token it does not use")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in pod["containers"]:
        context = container.get("securityContext", {})
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true")
        if (context.get("capabilities") or {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities are not drop [ALL]")
        for port in container.get("ports", []):
            if port["containerPort"] < 1024:
                problems.append(f"{name}: port {port['containerPort']} needs NET_BIND_SERVICE, which is dropped")
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        writable = {
            str(settings.data_dir): "persistentVolumeClaim",
            str(settings.data_dir / settings.wake_dir.relative_to(settings.data_dir).parts[0]): "emptyDir",
            "/tmp": "emptyDir",
        }
        for path, kind in writable.items():
            mount = mounts.get(path)
            if mount is None or mount.get("readOnly"):
                problems.append(f"{name}: {path} is not mounted writable (read-only root file system)")
            elif kind not in volumes.get(mount["name"], {}):
                problems.append(f"{name}: {path} is not a {kind} volume")
    return problems


def check_resources(deployments: list[dict[str, Any]]) -> list[str]:
    """Requests and limits for CPU and memory, requests not above limits, and inference threads
    pinned to at most the CPU limit (ONNX Runtime defaults to the node's core count)."""
    problems = []
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        for container in containers(deployment):
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(part, {}):
                        problems.append(f"{name}: no {part}.{resource}")
            for resource in ("cpu", "memory"):
                low = resources.get("requests", {}).get(resource)
                high = resources.get("limits", {}).get(resource)
                if low is not None and high is not None and _quantity(low) > _quantity(high):
                    problems.append(f"{name}: requests.{resource} {low} above limits.{resource} {high}")
            if container.get("args", [])[:1] == ["worker"]:
                threads = literal_env(container).get("PNEUMO_INFERENCE__INTRA_OP_THREADS")
                limit = resources.get("limits", {}).get("cpu")
                if threads is None or threads == "0":
                    problems.append(f"{name}: inference.intra_op_threads not pinned (ONNX Runtime would use the node's cores)")
                elif limit is not None and int(threads) > _quantity(limit):
                    problems.append(f"{name}: {threads} inference threads over a CPU limit of {limit}")
    return problems


_SUFFIXES = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}


def _quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "2", "1Gi") as a number."""
    text = str(value)
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(text)


def check_scaling(manifests: Manifests, worker: str, gateway: str, claim: str) -> list[str]:
    """The HPA scales the worker Deployment on CPU (which needs CPU requests); the PDB selects the
    worker pods; gateway and workers mount the same ReadWriteMany claim; the gateway is one
    Recreate replica (two serve pods on one store would sweep each other's staging files)."""
    problems = []
    deployments = {d["metadata"]["name"]: d for d in manifests.of_kind("Deployment")}
    hpas = manifests.of_kind("HorizontalPodAutoscaler")
    if not any(h["spec"]["scaleTargetRef"]["name"] == worker and h["spec"]["scaleTargetRef"]["kind"] == "Deployment"
               for h in hpas):
        problems.append(f"no HorizontalPodAutoscaler scales Deployment {worker}")
    for hpa in hpas:
        target = deployments.get(hpa["spec"]["scaleTargetRef"]["name"])
        if target is None:
            problems.append(f"HPA {hpa['metadata']['name']}: scales a Deployment that does not exist")
            continue
        if target["metadata"]["name"] == gateway:
            problems.append(f"HPA {hpa['metadata']['name']}: scales the gateway, which must stay one replica")
        uses_cpu = any((m.get("resource") or {}).get("name") == "cpu" for m in hpa["spec"].get("metrics", []))
        if uses_cpu and any("cpu" not in c.get("resources", {}).get("requests", {}) for c in containers(target)):
            problems.append(f"HPA {hpa['metadata']['name']}: CPU utilisation of pods without CPU requests")
    worker_labels = deployments[worker]["spec"]["template"]["metadata"]["labels"]
    pdbs = manifests.of_kind("PodDisruptionBudget")
    if not any(p["spec"]["selector"]["matchLabels"].items() <= worker_labels.items() for p in pdbs):
        problems.append(f"no PodDisruptionBudget selects the {worker} pods")
    pvc = manifests.named("PersistentVolumeClaim", claim)
    if pvc["spec"].get("accessModes") != ["ReadWriteMany"]:
        problems.append(f"PVC {claim}: {pvc['spec'].get('accessModes')}, gateway and workers on other nodes need ReadWriteMany")
    for name in (gateway, worker):
        claims = {v["persistentVolumeClaim"]["claimName"] for v in deployments[name]["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        if claims != {claim}:
            problems.append(f"{name}: mounts claims {sorted(claims)}, not the shared {claim}")
    spec = deployments[gateway]["spec"]
    if spec.get("replicas", 1) != 1 or spec.get("strategy", {}).get("type") != "Recreate":
        problems.append(f"{gateway}: must be 1 replica with strategy Recreate (one serve per file store)")
    return problems


def toml_settings(configmap: dict[str, Any]) -> dict[str, Any]:
    """The ConfigMap's pneumo.toml parsed (TOML syntax errors raise here)."""
    return tomllib.loads(pneumo_toml(configmap))


def check_config_mount(deployment: dict[str, Any], configmap: str) -> list[str]:
    """$PNEUMO_CONFIG names the pneumo.toml that the ConfigMap projects into the container."""
    name = deployment["metadata"]["name"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = containers(deployment)
    config = literal_env(container).get("PNEUMO_CONFIG")
    if config is None:
        return [f"{name}: no PNEUMO_CONFIG (the image's default /etc/pneumo/pneumo.toml is not mounted)"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        source = volumes.get(mount["name"], {}).get("configMap")
        if source is None or source.get("name") != configmap:
            continue
        items = source.get("items") or [{"key": "pneumo.toml", "path": "pneumo.toml"}]
        for item in items:
            if item["key"] == "pneumo.toml" and str(PurePosixPath(mount["mountPath"]) / item["path"]) == config:
                return []
    return [f"{name}: PNEUMO_CONFIG={config} is not ConfigMap {configmap}'s pneumo.toml as mounted"]
