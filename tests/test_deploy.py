"""deploy/: the container image, the compose file and the Kubernetes manifests (docs/deployment.md).

No Docker engine or kubectl here: the kustomizations are rendered by a small loader that follows what they
use (resources, namespace, labels, images, generators, strategic-merge patches), every built-in object is
validated with kubernetes-validate (strict, offline schemas), the CRD objects against JSON schemas of the
fields used, and the wiring between objects is checked: what scales what, which queue, probes, drain times,
non-root, secrets and settings.
"""

from __future__ import annotations

import copy
import functools
import http.server
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml

from authnotify.config import ENV_PREFIX, Settings
from authnotify.messaging.topology import CONSUMER_NAMES

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# The oldest Kubernetes the manifests promise to work on; kubernetes-validate ships its schemas offline.
KUBERNETES_VERSION = "1.33"
INGRESS_PORT = 8080
WORKER_PORT = 9090
WORKER_TYPES = tuple(CONSUMER_NAMES)
STORE_WORKERS = ("authcode-created", "token-created", "token-canceled")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


# --- a small kustomize ------------------------------------------------------------------------------


class KustomizeError(Exception):
    pass


def _load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _identity(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _strategic_merge(base: Any, patch: Any) -> Any:
    """Maps merge key by key (None deletes); lists of named items merge by name; other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = _strategic_merge(merged[key], value)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if (isinstance(base, list) and isinstance(patch, list)
            and all(isinstance(item, dict) and "name" in item for item in base + patch)):
        merged_list = [copy.deepcopy(item) for item in base]
        index = {item["name"]: i for i, item in enumerate(merged_list)}
        for item in patch:
            if item["name"] in index:
                merged_list[index[item["name"]]] = _strategic_merge(merged_list[index[item["name"]]], item)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def _generated(kind: str, spec: dict[str, Any], directory: Path) -> dict[str, Any]:
    data: dict[str, str] = {}
    for literal in spec.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    for env_file in spec.get("envs", []):
        for line in (directory / env_file).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                data[key.strip()] = value
    for entry in spec.get("files", []):
        key, _, source = entry.rpartition("=")
        data[key or Path(source).name] = (directory / source).read_text()
    unknown = set(spec) - {"name", "namespace", "behavior", "literals", "envs", "files", "type"}
    if unknown:
        raise KustomizeError(f"{directory}: generator {spec['name']}: unsupported {sorted(unknown)}")
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if "namespace" in spec:
        obj["metadata"]["namespace"] = spec["namespace"]
    if kind == "Secret":
        obj["type"] = spec.get("type", "Opaque")
        obj["stringData"] = data
    else:
        obj["data"] = data
    return obj


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = pod_spec(obj)
    return (pod.get("containers", []) + pod.get("initContainers", [])) if pod else []


def render(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build DIRECTORY` for the features these kustomizations use; anything else is an error."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "generatorOptions",
             "configMapGenerator", "secretGenerator", "patches"}
    unknown = set(kustomization) - known
    if unknown:
        raise KustomizeError(f"{directory}: the test renderer does not support {sorted(unknown)}")

    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        target = directory / entry
        objects.extend(render(target) if target.is_dir() else _load_documents(target))
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        if _identity(obj) in seen:
            raise KustomizeError(f"{directory}: {_identity(obj)} defined twice")
        seen.add(_identity(obj))

    generators = [("ConfigMap", spec) for spec in kustomization.get("configMapGenerator", [])]
    generators += [("Secret", spec) for spec in kustomization.get("secretGenerator", [])]
    if generators and not kustomization.get("generatorOptions", {}).get("disableNameSuffixHash"):
        raise KustomizeError(f"{directory}: generators need disableNameSuffixHash (no name rewriting here)")
    for kind, spec in generators:
        generated = _generated(kind, spec, directory)
        behavior = spec.get("behavior", "create")
        # Like kustomize, merge/replace match the namespace too: a generator without one looks in "default".
        existing = [o for o in objects if _identity(o) == (kind, spec["name"])
                    and o["metadata"].get("namespace", "default") == spec.get("namespace", "default")]
        if behavior == "create":
            if existing:
                raise KustomizeError(f"{directory}: {kind} {spec['name']} exists; use behavior merge/replace")
            objects.append(generated)
            continue
        if not existing:
            raise KustomizeError(f"{directory}: {kind} {spec['name']} to {behavior} does not exist")
        old = existing[0]
        if behavior == "replace":
            generated["metadata"] = copy.deepcopy(old["metadata"])
            objects[objects.index(old)] = generated
        elif behavior == "merge":
            field = "stringData" if kind == "Secret" else "data"
            merged = copy.deepcopy(old)
            merged.setdefault(field, {}).update(generated.get(field, {}))
            objects[objects.index(old)] = merged
        else:
            raise KustomizeError(f"{directory}: unknown generator behavior {behavior!r}")

    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) - {"path", "patch"}:
            raise KustomizeError(f"{directory}: only path/patch strategic-merge patches are supported")
        documents = (_load_documents(directory / patch_entry["path"]) if "path" in patch_entry
                     else [d for d in yaml.safe_load_all(patch_entry["patch"]) if d])
        for patch in documents:
            matches = [o for o in objects if _identity(o) == _identity(patch)]
            if len(matches) != 1:
                raise KustomizeError(f"{directory}: patch target {_identity(patch)} not found")
            if patch.get("$patch") == "delete":
                objects.remove(matches[0])
            else:
                objects[objects.index(matches[0])] = _strategic_merge(matches[0], patch)

    if namespace := kustomization.get("namespace"):
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    for label_spec in kustomization.get("labels", []):
        if label_spec.get("includeSelectors"):
            raise KustomizeError(f"{directory}: labels with includeSelectors are not supported")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label_spec["pairs"])
            template = obj.get("spec", {}).get("template") if label_spec.get("includeTemplates") else None
            if isinstance(template, dict):
                template.setdefault("metadata", {}).setdefault("labels", {}).update(label_spec["pairs"])
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return objects


# --- helpers ----------------------------------------------------------------------------------------


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    template = obj.get("spec", {}).get("template")
    if obj["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet") and template:
        return template["spec"]
    return None


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def authnotify_containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for obj in objects:
        for container in _containers(obj):
            if container["image"].split(":")[0].endswith("authnotify"):
                yield obj, container


def worker_name(container: dict[str, Any]) -> str | None:
    args = container.get("command", []) + container.get("args", [])
    return args[1] if len(args) == 2 and args[0] == "worker" else None


SETTINGS_VARIABLES = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def check_settings_values(values: dict[str, str], where: str) -> None:
    """Every AUTHNOTIFY_* name is a Settings field and every literal value is one Settings accepts."""
    for name, value in values.items():
        if not name.startswith(ENV_PREFIX):
            continue
        assert name in SETTINGS_VARIABLES, f"{where}: {name} is not a setting authnotify.config.settings.Settings knows"
        if value.startswith("@") or "${" in value or name.endswith("_CLIENT_ID"):
            # key files are checked where they are mounted; a client id alone would require its keys
            continue
        field = name.removeprefix(ENV_PREFIX).lower()
        try:
            Settings(_env_file=None, **{field: value})
        except pydantic.ValidationError as exc:
            pytest.fail(f"{where}: {name}={value!r} is refused: {exc.errors()[0]['msg']}")


@pytest.fixture(scope="module", autouse=True)
def _schemas_read_once() -> Iterator[None]:
    """kubernetes-validate re-reads its (large) schema files for every object; read each once here."""
    original = kubernetes_validate.utils.schema_contents
    kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(original)
    yield
    kubernetes_validate.utils.schema_contents = original


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(K8S / "base")


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The production overlay rendered with stand-in secret files (the real ones never leave the host)."""
    copy_root = tmp_path_factory.mktemp("k8s")
    shutil.copytree(K8S, copy_root, dirs_exist_ok=True)
    secrets = copy_root / "overlays" / "production" / "secrets"
    (secrets / "app.env").write_text(
        "rabbitmq-url=amqp://authnotify:pw@authnotify-rabbitmq.authnotify.svc:5672/\n"
        "database-url=postgresql+asyncpg://authnotify:pw@db.example.internal:5432/authnotify\n"
        "token-keys=stand-in\n"
    )
    for name in ("ams-private-key", "ams-alipay-public-key", "aps-private-key", "aps-alipay-public-key"):
        (secrets / f"{name}.pem").write_text(f"stand-in {name}\n")
    (secrets / "merchants.toml").write_text('[merchants.default]\nurl = "https://m.example/h"\n')
    return render(copy_root / "overlays" / "production")


# --- CRD schemas (the fields these manifests use; unknown fields are errors) -----------------------

_METADATA = {"type": "object", "required": ["name"],
             "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                            "namespace": {"type": "string"},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
             "additionalProperties": False}
_QUANTITY = {"type": ["string", "integer"], "pattern": r"^[0-9.]+(m|Ki|Mi|Gi|Ti|k|M|G|T)?$"}
_RESOURCES = {"type": "object", "additionalProperties": False, "properties": {
    part: {"type": "object", "additionalProperties": False,
           "properties": {"cpu": _QUANTITY, "memory": _QUANTITY}} for part in ("requests", "limits")}}


def _crd(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "additionalProperties": False,
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                           "metadata": _METADATA, "spec": spec}}


CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": _crd("keda.sh/v1alpha1", "ScaledObject", {
        "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
        "properties": {
            "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                               "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                              "apiVersion": {"type": "string"}}},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "advanced": {"type": "object", "additionalProperties": False, "properties": {
                "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                  "properties": {"behavior": {"type": "object"}}}}},
            "triggers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                "properties": {
                    "type": {"const": "rabbitmq"},
                    "metadata": {"type": "object", "required": ["queueName", "mode", "value"],
                                 "additionalProperties": False, "properties": {
                                     "protocol": {"enum": ["amqp", "http", "auto"]},
                                     "queueName": {"type": "string"},
                                     "mode": {"enum": ["QueueLength", "MessageRate"]},
                                     # KEDA trigger metadata values are strings
                                     "value": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                     "activationValue": {"type": "string"},
                                     "vhostName": {"type": "string"}}},
                    "authenticationRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                          "properties": {"name": {"type": "string"},
                                                         "kind": {"enum": ["TriggerAuthentication",
                                                                           "ClusterTriggerAuthentication"]}}}}}},
        }}),
    "TriggerAuthentication": _crd("keda.sh/v1alpha1", "TriggerAuthentication", {
        "type": "object", "required": ["secretTargetRef"], "additionalProperties": False,
        "properties": {"secretTargetRef": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["parameter", "name", "key"], "additionalProperties": False,
            "properties": {"parameter": {"type": "string"}, "name": {"type": "string"}, "key": {"type": "string"}}}}}}),
    "RabbitmqCluster": _crd("rabbitmq.com/v1beta1", "RabbitmqCluster", {
        "type": "object", "required": ["replicas"], "additionalProperties": False,
        "properties": {
            "replicas": {"type": "integer", "minimum": 1},
            "image": {"type": "string"},
            "resources": _RESOURCES,
            "persistence": {"type": "object", "additionalProperties": False,
                            "properties": {"storage": _QUANTITY, "storageClassName": {"type": "string"}}},
            "rabbitmq": {"type": "object", "additionalProperties": False,
                         "properties": {"additionalConfig": {"type": "string"},
                                        "additionalPlugins": {"type": "array", "items": {"type": "string"}}}},
            "affinity": {"type": "object"},
        }}),
}


def validate(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in CRD_SCHEMAS:
            try:
                jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
            except jsonschema.ValidationError as exc:
                pytest.fail(f"{where}: {'.'.join(map(str, exc.absolute_path))}: {exc.message}")
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")


# --- Kubernetes -------------------------------------------------------------------------------------


def test_kubernetes_validate_has_the_chosen_version() -> None:
    assert KUBERNETES_VERSION in {kubernetes_validate.utils.major_minor(v)
                                  for v in kubernetes_validate.utils.all_versions()}


@pytest.mark.parametrize("overlay", ["base", "production"])
def test_every_manifest_validates_against_its_schema(overlay: str, request: pytest.FixtureRequest) -> None:
    objects = request.getfixturevalue(overlay)
    assert objects
    validate(objects)
    namespaced = [o for o in objects if o["kind"] not in CLUSTER_SCOPED]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"authnotify"}


def test_the_renderer_refuses_what_it_does_not_understand(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)


def test_strict_validation_catches_a_misspelt_field(base: list[dict[str, Any]]) -> None:
    deployment = copy.deepcopy(by_kind(base, "Deployment")["authnotify-ingress"])
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    scaled = copy.deepcopy(next(iter(by_kind(base, "ScaledObject").values())))
    scaled["spec"]["triggers"][0]["metadata"]["queueLenght"] = "5"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, CRD_SCHEMAS["ScaledObject"])


@pytest.mark.parametrize("overlay", ["base", "production"])
def test_one_deployment_and_one_scaled_object_per_worker_type_on_its_queue(
        overlay: str, request: pytest.FixtureRequest) -> None:
    objects = request.getfixturevalue(overlay)
    deployments = by_kind(objects, "Deployment")
    config = by_kind(objects, "ConfigMap")["authnotify-config"]["data"]
    namespace = config["AUTHNOTIFY_NAMESPACE"]
    secrets = by_kind(objects, "Secret")
    auths = by_kind(objects, "TriggerAuthentication")

    workers: dict[str, str] = {}
    for deployment_name, deployment in deployments.items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if (name := worker_name(container)) is not None:
                assert name not in workers, f"worker {name} runs in two deployments"
                workers[name] = deployment_name
                assert len(deployment["spec"]["template"]["spec"]["containers"]) == 1
    assert sorted(workers) == sorted(WORKER_TYPES)

    scaled_objects = list(by_kind(objects, "ScaledObject").values())
    assert len(scaled_objects) == len(WORKER_TYPES)
    targets = {s["spec"]["scaleTargetRef"]["name"]: s for s in scaled_objects}
    for worker, deployment_name in workers.items():
        scaled = targets.get(deployment_name)
        assert scaled is not None, f"no ScaledObject targets {deployment_name}"
        assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert scaled["spec"]["minReplicaCount"] >= 1
        assert scaled["spec"]["maxReplicaCount"] > scaled["spec"]["minReplicaCount"]
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["queueName"] == f"{namespace}.{worker}"
        assert trigger["metadata"]["mode"] == "QueueLength"
        auth = auths[trigger["authenticationRef"]["name"]]
        (ref,) = auth["spec"]["secretTargetRef"]
        assert ref["parameter"] == "host"
        assert ref["key"] in secrets[ref["name"]]["stringData"]
        # The Deployment leaves the replica count to KEDA, or every apply would fight it.
        assert "replicas" not in deployments[deployment_name]["spec"]
    assert not set(targets) - set(deployments.keys())


def test_ingress_has_service_hpa_and_disruption_budget(base: list[dict[str, Any]]) -> None:
    ingress = by_kind(base, "Deployment")["authnotify-ingress"]
    pod = ingress["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["ingress"]
    assert "replicas" not in ingress["spec"]
    pod_labels = pod["metadata"]["labels"]
    assert ingress["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = by_kind(base, "Service")["authnotify-ingress"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert [port_names.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]] == [INGRESS_PORT]

    hpa = by_kind(base, "HorizontalPodAutoscaler")["authnotify-ingress"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": "authnotify-ingress"}
    assert hpa["spec"]["minReplicas"] >= 2
    assert all(c["resources"]["requests"].get("cpu") for c in pod["spec"]["containers"])  # CPU utilisation needs it

    pdb = by_kind(base, "PodDisruptionBudget")["authnotify-ingress"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a drain can always evict one


def test_probes_point_at_readyz_and_healthz_on_the_container_port(base: list[dict[str, Any]]) -> None:
    config = by_kind(base, "ConfigMap")["authnotify-config"]["data"]
    assert int(config["AUTHNOTIFY_HTTP_PORT"]) == INGRESS_PORT
    assert int(config["AUTHNOTIFY_WORKER_HTTP_PORT"]) == WORKER_PORT
    checked = 0
    for obj, container in authnotify_containers(base):
        if obj["kind"] != "Deployment":
            continue
        expected_port = WORKER_PORT if worker_name(container) else INGRESS_PORT
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert list(ports.values()) == [expected_port]
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"),
                            ("startupProbe", "/healthz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{obj['metadata']['name']} {probe}"
            assert ports.get(get["port"], get["port"]) == expected_port, f"{obj['metadata']['name']} {probe}"
        checked += 1
    assert checked == 1 + len(WORKER_TYPES)


def test_grace_periods_are_long_enough_to_drain(base: list[dict[str, Any]]) -> None:
    deployments = by_kind(base, "Deployment")
    ingress = deployments["authnotify-ingress"]["spec"]["template"]["spec"]
    pre_stop = ingress["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # preStop delay + stop accepting + the 5 s publish-confirm timeout, with margin
    assert ingress["terminationGracePeriodSeconds"] >= 30 + int(pre_stop[1])
    for worker in WORKER_TYPES:
        grace = deployments[f"authnotify-worker-{worker}"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        # a merchant delivery may take 15 s and is completed; applyToken times out after 5 s
        assert grace >= (45 if worker == "merchant-events" else 30), worker


@pytest.mark.parametrize("overlay", ["base", "production"])
def test_pods_run_non_root_on_a_read_only_root_filesystem_with_limits(
        overlay: str, request: pytest.FixtureRequest) -> None:
    objects = request.getfixturevalue(overlay)
    workloads = [o for o in objects if pod_spec(o) is not None]
    assert workloads
    for obj in workloads:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        pod = pod_spec(obj)
        assert pod is not None
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] != 0, where
        assert pod.get("automountServiceAccountToken") is False, where
        for container in _containers(obj):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert container["resources"]["requests"].keys() >= {"cpu", "memory"}, where
            assert container["resources"]["limits"].keys() >= {"memory"}, where
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            if container["image"].split(":")[0].endswith("authnotify"):
                assert "/tmp" in mounts, f"{where}: read-only root needs a writable /tmp"


@pytest.mark.parametrize("overlay", ["base", "production"])
def test_settings_secrets_and_key_files_are_wired(overlay: str, request: pytest.FixtureRequest) -> None:
    objects = request.getfixturevalue(overlay)
    config_maps = by_kind(objects, "ConfigMap")
    secrets = by_kind(objects, "Secret")
    for name, config_map in config_maps.items():
        check_settings_values(config_map["data"], f"ConfigMap/{name}")

    for obj, container in authnotify_containers(objects):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        pod = pod_spec(obj)
        assert pod is not None
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(config_maps[source["configMapRef"]["name"]]["data"])
        literal = {v["name"]: v["value"] for v in container.get("env", []) if "value" in v}
        check_settings_values(literal, where)
        env.update(literal)
        for variable in container.get("env", []):
            if "valueFrom" in variable:
                ref = variable["valueFrom"]["secretKeyRef"]
                assert ref["key"] in secrets[ref["name"]]["stringData"], f"{where}: {variable['name']}"
                # Names only: base secret values are placeholders that must fail until replaced.
                assert variable["name"] in SETTINGS_VARIABLES, f"{where}: {variable['name']}"
                env[variable["name"]] = secrets[ref["name"]]["stringData"][ref["key"]]

        # Key values `@/path` and the merchants file must be files of a mounted Secret.
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        files: set[str] = set()
        for mount in container.get("volumeMounts", []):
            secret = volumes[mount["name"]].get("secret")
            if secret:
                assert mount.get("readOnly") is True, where
                files |= {f"{mount['mountPath']}/{key}" for key in secrets[secret["secretName"]]["stringData"]}
        for name, value in env.items():
            if name.endswith(("_PRIVATE_KEY", "_PUBLIC_KEY")):
                assert value.startswith("@") and value[1:] in files, f"{where}: {name}={value}"
            if name == "AUTHNOTIFY_MERCHANTS_FILE":
                assert value in files, where

        args = container.get("args", [])
        if args == ["ingress"] or worker_name(container):
            assert env["AUTHNOTIFY_RABBITMQ_URL"].startswith("amqp")
        stores = args == ["migrate"] or worker_name(container) in STORE_WORKERS
        if stores:
            assert env["AUTHNOTIFY_DATABASE_URL"].startswith("postgresql+asyncpg://"), where
        # Token keys only where tokens are stored; the ingress and the merchant deliverer never hold them.
        assert ("AUTHNOTIFY_TOKEN_KEYS" in env) == (worker_name(container) in STORE_WORKERS), where
        assert ("AUTHNOTIFY_MERCHANTS_FILE" in env) == (worker_name(container) == "merchant-events"), where


def test_rabbitmq_cluster_of_three_with_quorum_queues(base: list[dict[str, Any]]) -> None:
    (cluster,) = by_kind(base, "RabbitmqCluster").values()
    assert cluster["spec"]["replicas"] == 3
    assert "default_queue_type = quorum" in cluster["spec"]["rabbitmq"]["additionalConfig"]
    assert by_kind(base, "ConfigMap")["authnotify-config"]["data"]["AUTHNOTIFY_QUEUE_TYPE"] == "quorum"
    # The processes and KEDA reach the cluster through the Service the operator names after it.
    url = by_kind(base, "Secret")["authnotify-app"]["stringData"]["rabbitmq-url"]
    assert re.match(rf"amqp://[^@]+@{cluster['metadata']['name']}\.authnotify\.svc:5672/$", url)


def test_migration_job_and_postgres(base: list[dict[str, Any]], production: list[dict[str, Any]]) -> None:
    (job,) = by_kind(base, "Job").values()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"]
    assert job["spec"]["ttlSecondsAfterFinished"] > 0  # a finished Job goes, so the next apply can recreate it

    # Base: an in-cluster PostgreSQL 16 behind a Service named in the database URL.
    statefulset = by_kind(base, "StatefulSet")["authnotify-postgres"]
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["image"].startswith("postgres:16")
    assert statefulset["spec"]["serviceName"] in by_kind(base, "Service")
    url = by_kind(base, "Secret")["authnotify-app"]["stringData"]["database-url"]
    assert "@authnotify-postgres.authnotify.svc:5432/" in url

    # Production: a managed PostgreSQL; the in-cluster one and its password are gone, secrets come from files.
    assert "authnotify-postgres" not in by_kind(production, "StatefulSet")
    assert "authnotify-postgres" not in by_kind(production, "Service")
    assert "authnotify-postgres" not in by_kind(production, "Secret")
    app = by_kind(production, "Secret")["authnotify-app"]["stringData"]
    assert app["database-url"].startswith("postgresql+asyncpg://") and "db.example.internal" in app["database-url"]
    keys = by_kind(production, "Secret")["authnotify-keys"]["stringData"]
    assert all(value.startswith("stand-in") for value in keys.values())
    images = {c["image"] for _, c in authnotify_containers(production)}
    assert len(images) == 1 and not images.pop().endswith(":latest")


def test_production_secret_files_stay_out_of_git() -> None:
    for directory in (K8S / "overlays" / "production" / "secrets", DEPLOY / "secrets"):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(directory / "app.env")], cwd=ROOT)
        assert ignored.returncode == 0, f"{directory} is not ignored by git"


# --- compose ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_compose_names_every_process_with_its_command(compose: dict[str, Any]) -> None:
    services = compose["services"]
    expected = {"ingress": ["ingress"], "migrate": ["migrate"]}
    expected |= {f"worker-{name}": ["worker", name] for name in WORKER_TYPES}
    assert set(services) == set(expected) | {"rabbitmq", "postgres"}
    for name, command in expected.items():
        assert services[name]["command"] == command, name
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / services[name]["build"]["context"] / "deploy" / "Dockerfile").is_file()
    assert re.fullmatch(r"rabbitmq:3\.1[3-9]-management", services["rabbitmq"]["image"])
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["ingress"]["ports"] == ["${AUTHNOTIFY_PUBLISH_PORT:-8080}:8080"]


def test_compose_start_order_health_and_drain(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("rabbitmq", "postgres"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"
    assert services["ingress"]["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}
    for worker in WORKER_TYPES:
        service = services[f"worker-{worker}"]
        assert service["depends_on"] == {"rabbitmq": {"condition": "service_healthy"},
                                         "migrate": {"condition": "service_completed_successfully"}}
        assert "ports" not in service  # scaled with --scale: no fixed host port
        assert _seconds(service["stop_grace_period"]) >= (45 if worker == "merchant-events" else 30)
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"]
    assert _seconds(services["ingress"]["stop_grace_period"]) >= 30


def test_compose_settings_and_key_files(compose: dict[str, Any]) -> None:
    declared = compose["secrets"]
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        check_settings_values({k: str(v) for k, v in environment.items()}, f"compose {name}")
        mounted = {}
        for secret in service.get("secrets", []):
            source = secret if isinstance(secret, str) else secret["source"]
            target = secret if isinstance(secret, str) else secret.get("target", source)
            assert source in declared, f"compose {name}: secret {source} is not declared"
            mounted[f"/run/secrets/{target}"] = source
        for variable, value in environment.items():
            if variable.endswith(("_PRIVATE_KEY", "_PUBLIC_KEY")):
                assert value.startswith("@") and value[1:] in mounted, f"compose {name}: {variable}"
            if variable == "AUTHNOTIFY_MERCHANTS_FILE":
                assert value in mounted, f"compose {name}: {variable}"
    for secret in declared.values():
        assert secret["file"].startswith("./secrets/")

    example = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            example[key] = value
    check_settings_values(example, "deploy/.env.example")
    interpolated = set(re.findall(r"\$\{([A-Z_]+)", (DEPLOY / "compose.yaml").read_text()))
    assert interpolated <= set(example) | {"AUTHNOTIFY_IMAGE", "AUTHNOTIFY_PUBLISH_PORT"}


# --- image ------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()
                                            if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in joined.splitlines() if line.strip()]


def healthcheck_program() -> str:
    (healthcheck,) = [args for op, args in dockerfile_instructions() if op == "HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
    assert command[:2] == ["python", "-c"]
    return command[2]


def test_dockerfile_is_multi_stage_slim_non_root_with_healthcheck_and_entrypoint() -> None:
    instructions = dockerfile_instructions()
    args = {m.group(1): m.group(2) for op, a in instructions if op == "ARG"
            for m in [re.fullmatch(r"(\w+)=(\S+)", a)] if m}
    stages = [a.split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", "")) for op, a in instructions
              if op == "FROM"]
    assert len(stages) >= 2 and all(s.startswith("python:3.11-slim") for s in stages)
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    final_ops = dict(final)
    user = final_ops["USER"].split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) >= 1000)
    assert "COPY" in final_ops and "--from=build" in final_ops["COPY"]
    assert json.loads(final_ops["ENTRYPOINT"]) == ["authnotify"]
    assert json.loads(final_ops["CMD"]) == ["ingress"]
    assert "HEALTHCHECK" in final_ops
    compile(healthcheck_program(), "HEALTHCHECK", "exec")

    # What the build copies exists and survives .dockerignore; nothing else is sent.
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*"
    included = {line[1:] for line in ignore if line.startswith("!")}
    for op, arguments in instructions:
        if op == "COPY" and not arguments.startswith("--from"):
            for source in shlex.split(arguments)[:-1]:
                assert (ROOT / source).exists(), source
                assert source in included, f"{source} is excluded by .dockerignore"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("command", [["ingress"], ["worker", "token-created"]])
def test_healthcheck_probes_the_port_of_the_process_it_runs_beside(
        command: list[str], health_server: http.server.HTTPServer, tmp_path: Path) -> None:
    """The image's HEALTHCHECK, run for real with /proc/1/cmdline stood in by a file."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"\0".join([b"/opt/authnotify/bin/python", b"/opt/authnotify/bin/authnotify",
                                    *(part.encode() for part in command)]) + b"\0")
    program = healthcheck_program().replace("/proc/1/cmdline", str(cmdline))
    port = str(health_server.server_address[1])
    is_worker = command[0] == "worker"
    own, other = (("AUTHNOTIFY_WORKER_HTTP_PORT", "AUTHNOTIFY_HTTP_PORT") if is_worker
                  else ("AUTHNOTIFY_HTTP_PORT", "AUTHNOTIFY_WORKER_HTTP_PORT"))

    def run(env: dict[str, str]) -> int:
        return subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, timeout=10).returncode

    assert run({own: port, other: "1"}) == 0
    assert run({own: "1", other: port}) != 0  # the other process's port is not this one's health
    _Health.status = 503
    try:
        assert run({own: port}) != 0
    finally:
        _Health.status = 200
    if is_worker:
        assert run({own: "0"}) == 0  # health endpoint turned off: nothing to check
