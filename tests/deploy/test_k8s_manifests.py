"""deploy/k8s checked offline (no cluster here): every object against the Kubernetes JSON schemas
(kubernetes-validate, strict), pneumo.toml against conf/settings.py, and the manifests against the
code (tests/deploy/k8s_checks.py); each check also run on a broken copy to show it can fail."""

from __future__ import annotations

import copy
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from conf.settings import Settings, load_settings
from gateway.http import build_app
from tests.deploy import compose_checks as cc
from tests.deploy import k8s_checks as kc

GATEWAY, WORKER, CONFIGMAP, CLAIM = "pneumo-gateway", "pneumo-worker", "pneumo-config", "pneumo-data"
COMMANDS = {GATEWAY: "serve", WORKER: "worker"}


@pytest.fixture(scope="module")
def manifests() -> kc.Manifests:
    return kc.Manifests.load()


@pytest.fixture(scope="module")
def image_env() -> dict[str, str]:
    return cc.Dockerfile.parse((cc.ROOT / "Dockerfile").read_text()).env()


@pytest.fixture(scope="module")
def image_uid() -> int:
    users = [rest for kw, rest in cc.Dockerfile.parse((cc.ROOT / "Dockerfile").read_text()).final_stage() if kw == "USER"]
    return int(users[-1].split(":")[0])


@pytest.fixture
def m(manifests: kc.Manifests) -> kc.Manifests:
    """A copy each test may break."""
    return copy.deepcopy(manifests)


def settings_of(m: kc.Manifests, deployment: str, tmp_path: Path, image_env: dict[str, str],
                monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What a pod builds: the ConfigMap's pneumo.toml, the image's ENV, the container's env."""
    toml = tmp_path / "pneumo.toml"
    toml.write_text(kc.pneumo_toml(m.named("ConfigMap", CONFIGMAP)))
    (container,) = kc.containers(m.named("Deployment", deployment))
    env = {**image_env, **kc.literal_env(container)}
    env = {k: v for k, v in env.items() if v != "<from a Secret>"}
    return cc.settings_with(toml, env, monkeypatch)


@pytest.fixture
def gateway_settings(m: kc.Manifests, tmp_path: Path, image_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    return settings_of(m, GATEWAY, tmp_path, image_env, monkeypatch)


@pytest.fixture
def worker_settings(m: kc.Manifests, tmp_path: Path, image_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    return settings_of(m, WORKER, tmp_path, image_env, monkeypatch)


def deployments(m: kc.Manifests) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in m.of_kind("Deployment")}


def container(m: kc.Manifests, name: str) -> dict[str, Any]:
    (only,) = kc.containers(m.named("Deployment", name))
    return only


def app_paths() -> set[str]:
    return {getattr(route, "path", "") for route in build_app(lambda: {}).routes}


# ------------------------------------------------------------------------- JSON schemas


@pytest.mark.parametrize("version", [kc.OLDEST_VERSION, kc.NEWEST_VERSION])
def test_every_object_is_valid_kubernetes(manifests: kc.Manifests, version: str) -> None:
    assert kc.check_schemas(manifests.documents + manifests.secrets, version) == []
    kinds = {d["kind"] for d in manifests.documents}
    assert {"Namespace", "ConfigMap", "Service", "PersistentVolumeClaim", "Deployment",
            "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    assert {s["kind"] for s in manifests.secrets} == {"Secret"}


def test_schema_check_fails_on_broken_objects(m: kc.Manifests) -> None:
    # The first error of each object is reported, so each object is broken in one way.
    container(m, GATEWAY)["livenessProbe"]["httpGett"] = container(m, GATEWAY)["livenessProbe"].pop("httpGet")
    container(m, WORKER)["ports"] = [{"containerPort": "11112"}]  # a string, not an integer
    del m.named("HorizontalPodAutoscaler", WORKER)["spec"]["maxReplicas"]  # required
    problems = kc.check_schemas(m.documents, kc.NEWEST_VERSION)
    assert any("httpGett" in p for p in problems), problems
    assert any("containerPort" in p for p in problems), problems
    assert any("maxReplicas" in p for p in problems), problems
    assert kc.check_schemas([{"apiVersion": "extensions/v1beta1", "kind": "Deployment", "metadata": {"name": "old"}}],
                            kc.NEWEST_VERSION)


def test_kustomization_lists_every_manifest(manifests: kc.Manifests, m: kc.Manifests) -> None:
    assert kc.check_kustomization(manifests.kustomization, kc.K8S_DIR, manifests.documents) == []
    broken = copy.deepcopy(m.kustomization)
    broken["resources"] = [r for r in broken["resources"] if "hpa" not in r] + ["manifests/missing.yaml",
                                                                               "secrets.example.yaml"]
    m.named("Service", "postgres")["metadata"]["namespace"] = "default"
    container(m, WORKER)["image"] = "elsewhere/pneumo:1"
    problems = kc.check_kustomization(broken, kc.K8S_DIR, m.documents)
    assert any("61-worker-hpa.yaml is not in" in p for p in problems), problems
    assert any("missing.yaml does not exist" in p for p in problems), problems
    assert any("overwrite the real ones" in p for p in problems), problems
    assert any("Service/postgres" in p for p in problems), problems
    assert any("elsewhere/pneumo" in p for p in problems), problems


# -------------------------------------------------------------- pneumo.toml and the code


def test_configmap_toml_is_valid_settings(manifests: kc.Manifests, gateway_settings: Settings) -> None:
    raw = kc.toml_settings(manifests.named("ConfigMap", CONFIGMAP))
    validated = Settings.model_validate(raw)
    assert validated.dicom.port == gateway_settings.dicom.port == 11112
    assert gateway_settings.fhir.tls.enabled and gateway_settings.storage.encryption.enabled
    assert gateway_settings.data_dir == Path("/var/lib/pneumo")


def test_toml_validation_fails_on_a_typo(manifests: kc.Manifests, tmp_path: Path) -> None:
    text = kc.pneumo_toml(manifests.named("ConfigMap", CONFIGMAP)).replace("port = 11112\n", "prot = 11112\n", 1)
    with pytest.raises(ValidationError, match="prot"):
        Settings.model_validate(tomllib.loads(text))
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValidationError):
        load_settings(tmp_path / "bad.toml")


def test_commands_are_pneumo_subcommands(m: kc.Manifests) -> None:
    assert kc.check_commands_are_pneumo(deployments(m), COMMANDS) == []
    container(m, GATEWAY)["args"] = ["serve-all"]
    container(m, WORKER)["args"] = ["serve"]
    problems = kc.check_commands_are_pneumo(deployments(m), COMMANDS)
    assert any("`pneumo serve-all` is not a pneumo command" in p for p in problems), problems
    assert any("expected `pneumo worker`" in p for p in problems), problems


def test_env_vars_are_settings(m: kc.Manifests) -> None:
    assert kc.check_env(deployments(m)) == []
    container(m, WORKER)["env"].append({"name": "PNEUMO_INFERENCE__INTRA_OP_THREAD", "value": "1"})
    container(m, GATEWAY)["env"].append({"name": "DATABASE_URL", "value": "x"})
    problems = kc.check_env(deployments(m))
    assert any("PNEUMO_INFERENCE__INTRA_OP_THREAD sets no setting" in p for p in problems), problems
    assert any("DATABASE_URL is not a PNEUMO_*" in p for p in problems), problems


def test_config_is_mounted_where_pneumo_config_points(m: kc.Manifests) -> None:
    for name in COMMANDS:
        assert kc.check_config_mount(m.named("Deployment", name), CONFIGMAP) == []
    for env in container(m, GATEWAY)["env"]:
        if env["name"] == "PNEUMO_CONFIG":
            env["value"] = "/etc/pneumo/pneumo.toml"
    assert kc.check_config_mount(m.named("Deployment", GATEWAY), CONFIGMAP)


def test_container_ports_are_the_listeners(m: kc.Manifests, gateway_settings: Settings) -> None:
    gateway = m.named("Deployment", GATEWAY)
    assert kc.check_gateway_listeners(gateway, gateway_settings) == []
    running_workers = gateway_settings.model_copy(
        update={"worker": gateway_settings.worker.model_copy(update={"enabled": True, "processes": 2})})
    assert any("worker processes" in p for p in kc.check_gateway_listeners(gateway, running_workers))
    container(m, GATEWAY)["ports"][0]["containerPort"] = 104
    container(m, GATEWAY)["ports"].pop()  # mllp
    problems = kc.check_gateway_listeners(gateway, gateway_settings)
    assert any("dicom 104" in p for p in problems), problems
    assert any("[hl7] port 2575: no container port" in p for p in problems), problems


def test_probes_hit_real_routes_with_the_right_scheme(m: kc.Manifests, gateway_settings: Settings) -> None:
    paths = app_paths()
    assert {"/health", "/ready"} <= paths
    gateway = m.named("Deployment", GATEWAY)
    assert kc.check_probes(gateway, gateway_settings, paths) == []
    mutual = gateway_settings.model_copy(update={"fhir": gateway_settings.fhir.model_copy(
        update={"tls": gateway_settings.fhir.tls.model_copy(update={"require_client_cert": True})})})
    assert any("require_client_cert" in p for p in kc.check_probes(gateway, mutual, paths))
    c = container(m, GATEWAY)
    c["readinessProbe"]["httpGet"]["path"] = "/readyz"
    c["livenessProbe"]["httpGet"]["scheme"] = "HTTP"
    c["startupProbe"]["httpGet"]["port"] = "dicom"
    problems = kc.check_probes(gateway, gateway_settings, paths)
    assert any("'/readyz' is not a route" in p for p in problems), problems
    assert any("livenessProbe: scheme HTTP" in p for p in problems), problems
    assert any("startupProbe: port 'dicom'" in p for p in problems), problems


def test_services_reach_declared_ports(m: kc.Manifests, gateway_settings: Settings) -> None:
    services = m.of_kind("Service")
    assert kc.check_services(services, m.of_kind("Deployment"), gateway_settings) == []
    tcp = m.named("Service", "pneumo-gateway-tcp")
    tcp["spec"]["ports"][0]["targetPort"] = "dicm"
    tcp["spec"]["externalTrafficPolicy"] = "Cluster"
    m.named("Service", "pneumo-gateway-http")["spec"]["selector"] = {"app": "nothing"}
    problems = kc.check_services(services, m.of_kind("Deployment"), gateway_settings)
    assert any("targetPort 'dicm'" in p for p in problems), problems
    assert any("externalTrafficPolicy" in p for p in problems), problems
    assert any("matches no Deployment" in p for p in problems), problems


def test_every_key_file_is_mounted_and_every_secret_file_is_read(
    m: kc.Manifests, gateway_settings: Settings, worker_settings: Settings
) -> None:
    wanted = kc.mounted_files(gateway_settings)
    assert {"audit.hmac_key_file", "storage.encryption.key_file", "fhir.auth.jwks_file",
            "dicom.tls.cert_file", "hl7.tls.key_file", "fhir.tls.ca_file"} <= set(wanted)
    for name, settings in ((GATEWAY, gateway_settings), (WORKER, worker_settings)):
        assert kc.check_mounted_files(m.named("Deployment", name), settings, m.secrets) == []
    worker = m.named("Deployment", WORKER)
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    volumes["audit-key"]["secret"]["items"][0]["path"] = "hmac-key"  # the setting's file is not there
    volumes["tls"]["secret"]["items"].append({"key": "spare.key", "path": "spare.key"})  # read by nobody
    m.secrets[0]["stringData"] = {"uri": "x"}  # pneumo-database without `url`
    problems = kc.check_mounted_files(worker, worker_settings, m.secrets)
    assert any("audit.hmac_key_file" in p and "no item hmac.key" in p for p in problems), problems
    assert any("spare.key" in p and "no setting names" in p for p in problems), problems
    assert any("PNEUMO_DATABASE_URL" in p for p in problems), problems


def test_pods_run_locked_down(m: kc.Manifests, gateway_settings: Settings, image_uid: int) -> None:
    assert image_uid == 10001
    for name in COMMANDS:
        assert kc.check_pod_security(m.named("Deployment", name), gateway_settings, image_uid) == []
    worker = m.named("Deployment", WORKER)
    worker["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0
    c = container(m, WORKER)
    c["securityContext"]["readOnlyRootFilesystem"] = False
    c["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    c["volumeMounts"] = [v for v in c["volumeMounts"] if v["mountPath"] != "/var/lib/pneumo/run"]
    problems = kc.check_pod_security(worker, gateway_settings, image_uid)
    assert any("runAsUser 0" in p for p in problems), problems
    assert any("readOnlyRootFilesystem" in p for p in problems), problems
    assert any("drop [ALL]" in p for p in problems), problems
    assert any("/var/lib/pneumo/run is not mounted" in p for p in problems), problems


def test_resources_are_bounded(m: kc.Manifests) -> None:
    assert kc.check_resources(m.of_kind("Deployment")) == []
    del container(m, GATEWAY)["resources"]["limits"]["memory"]
    container(m, WORKER)["resources"]["requests"]["cpu"] = "3"
    for env in container(m, WORKER)["env"]:
        if env["name"] == "PNEUMO_INFERENCE__INTRA_OP_THREADS":
            env["value"] = "4"
    problems = kc.check_resources(m.of_kind("Deployment"))
    assert any("no limits.memory" in p for p in problems), problems
    assert any("requests.cpu 3 above" in p for p in problems), problems
    assert any("4 inference threads" in p for p in problems), problems


def test_scaling_objects_fit_together(m: kc.Manifests) -> None:
    assert kc.check_scaling(m, WORKER, GATEWAY, CLAIM) == []
    m.named("HorizontalPodAutoscaler", WORKER)["spec"]["scaleTargetRef"]["name"] = GATEWAY
    m.named("PodDisruptionBudget", WORKER)["spec"]["selector"]["matchLabels"] = {"app": "other"}
    m.named("PersistentVolumeClaim", CLAIM)["spec"]["accessModes"] = ["ReadWriteOnce"]
    m.named("Deployment", GATEWAY)["spec"]["replicas"] = 2
    problems = kc.check_scaling(m, WORKER, GATEWAY, CLAIM)
    assert any("scales the gateway" in p for p in problems), problems
    assert any(f"no HorizontalPodAutoscaler scales Deployment {WORKER}" in p for p in problems), problems
    assert any("no PodDisruptionBudget" in p for p in problems), problems
    assert any("ReadWriteMany" in p for p in problems), problems
    assert any("1 replica with strategy Recreate" in p for p in problems), problems


# ------------------------------------------------- Kustomize itself, where kubectl is installed

KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="no kubectl on PATH (`kubectl kustomize` runs offline)")
def test_kustomize_builds_the_same_objects(manifests: kc.Manifests, tmp_path: Path) -> None:
    """`kubectl kustomize` (offline: no cluster) renders exactly the objects the checks above saw."""
    assert KUBECTL is not None
    built = subprocess.run([KUBECTL, "kustomize", str(kc.K8S_DIR)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    rendered = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == \
        sorted((d["kind"], d["metadata"]["name"]) for d in manifests.documents)
    assert kc.check_schemas(rendered, kc.OLDEST_VERSION) == []
    # A broken copy: a resource that does not exist fails the build.
    broken = tmp_path / "k8s"
    shutil.copytree(kc.K8S_DIR, broken)
    text = (broken / "kustomization.yaml").read_text().replace("61-worker-hpa.yaml", "62-missing.yaml")
    (broken / "kustomization.yaml").write_text(text)
    failed = subprocess.run([KUBECTL, "kustomize", str(broken)], capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "62-missing.yaml" in failed.stderr
