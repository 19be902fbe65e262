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
METRICS_PORT = 9091
API_PORT = 8088
WORKER_TYPES = tuple(CONSUMER_NAMES)
STORE_WORKERS = ("authcode-created", "token-created", "token-canceled", "token-refresh", "revocations")
# The workers that call Alipay's gateway (applyToken, revoke, cancelToken).
ALIPAY_WORKERS = ("authcode-created", "token-refresh", "revocations")
# Processes that publish lifecycle commands and events but consume no queue.
PUBLISHERS = ("scheduler", "api")
BROKER_ROLES = ("ingress", *WORKER_TYPES, *PUBLISHERS, "operator")
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
    unknown = set(spec) - {"name", "namespace", "behavior", "literals", "envs", "files", "type", "options"}
    if unknown or set(spec.get("options", {})) - {"labels", "annotations"}:
        raise KustomizeError(f"{directory}: generator {spec['name']}: unsupported {sorted(unknown) or spec['options']}")
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if "namespace" in spec:
        obj["metadata"]["namespace"] = spec["namespace"]
    for part in ("labels", "annotations"):
        if part in spec.get("options", {}):
            obj["metadata"][part] = dict(spec["options"][part])
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
                    if "digest" in image:
                        container["image"] = f"{image.get('newName', name)}@{image['digest']}"
                    else:
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
            if container["image"].split("@")[0].split(":")[0].endswith("authnotify"):
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
        "database-url=postgresql+asyncpg://authnotify:pw@db.example.internal:5432/authnotify?sslmode=verify-full\n"
        "token-keys=stand-in\n"
    )
    for role in BROKER_ROLES:
        (secrets / f"broker-{role}.env").write_text(
            f"username=authnotify-{role}\npassword=pw-{role}\n"
            f"rabbitmq-url=amqps://authnotify-{role}:pw-{role}@authnotify-rabbitmq.authnotify.svc:5671/"
            "?cafile=/run/secrets/authnotify-broker-ca/ca.crt\n")
    (secrets / "broker-keda.env").write_text(
        "username=authnotify-keda\npassword=pw\n"
        "management-url=https://authnotify-keda:pw@authnotify-rabbitmq.authnotify.svc:15671/\n")
    for name in ("ams-private-key", "ams-alipay-public-key", "aps-private-key", "aps-alipay-public-key"):
        (secrets / f"{name}.pem").write_text(f"stand-in {name}\n")
    (secrets / "merchants.toml").write_text('[merchants.default]\nurl = "https://m.example/h"\n'
                                            'secret = "@/run/secrets/authnotify-merchant-secrets/default"\n')
    (secrets / "merchant-secrets.env").write_text("default=stand-in\n")
    (secrets / "api-keys.toml").write_text('[keys.billing]\nsha256 = "00"\nscopes = ["tokens:read"]\n')
    (secrets / "console-session-key").write_text("stand-in\n")
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


_CLUSTER_REFERENCE = {"type": "object", "required": ["name"], "additionalProperties": False,
                      "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}}}


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
    # The RabbitMQ messaging-topology-operator's User and Permission (rabbitmq.com/v1beta1).
    "User": _crd("rabbitmq.com/v1beta1", "User", {
        "type": "object", "required": ["rabbitmqClusterReference"], "additionalProperties": False,
        "properties": {
            "rabbitmqClusterReference": _CLUSTER_REFERENCE,
            "tags": {"type": "array", "items": {"enum": ["management", "policymaker", "monitoring",
                                                         "administrator", "impersonator"]}},
            "importCredentialsSecret": {"type": "object", "required": ["name"], "additionalProperties": False,
                                        "properties": {"name": {"type": "string"}}}}}),
    "Permission": _crd("rabbitmq.com/v1beta1", "Permission", {
        "type": "object", "required": ["vhost", "permissions", "rabbitmqClusterReference"],
        "additionalProperties": False,
        "properties": {
            "vhost": {"type": "string"},
            "user": {"type": "string"},
            "userReference": {"type": "object", "required": ["name"], "additionalProperties": False,
                              "properties": {"name": {"type": "string"}}},
            "permissions": {"type": "object", "additionalProperties": False,
                            "required": ["configure", "write", "read"],
                            "properties": {part: {"type": "string", "format": "regex"}
                                           for part in ("configure", "write", "read")}},
            "rabbitmqClusterReference": _CLUSTER_REFERENCE}}),
    # The Prometheus Operator's PrometheusRule (monitoring.coreos.com/v1).
    "PrometheusRule": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {"type": "object", "required": ["groups"], "additionalProperties": False, "properties": {
                "groups": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name", "rules"], "additionalProperties": False, "properties": {
                        "name": {"type": "string"}, "interval": {"type": "string"},
                        "rules": {"type": "array", "minItems": 1, "items": {
                            "type": "object", "required": ["alert", "expr"], "additionalProperties": False,
                            "properties": {
                                "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*$"},
                                "expr": {"type": "string", "minLength": 1},
                                "for": {"type": "string", "pattern": r"^[0-9]+(s|m|h|d)$"},
                                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                "annotations": {"type": "object",
                                                "additionalProperties": {"type": "string"}}}}}}}}}}}},
    # The Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1).
    "ServiceMonitor": _crd("monitoring.coreos.com/v1", "ServiceMonitor", {
        "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
        "properties": {
            "selector": {"type": "object", "required": ["matchLabels"], "additionalProperties": False,
                         "properties": {"matchLabels": {"type": "object", "minProperties": 1,
                                                        "additionalProperties": {"type": "string"}}}},
            "namespaceSelector": {"type": "object", "additionalProperties": False,
                                  "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["port"], "additionalProperties": False,
                "properties": {
                    "port": {"type": "string"},
                    "path": {"type": "string", "pattern": "^/"},
                    "interval": {"type": "string", "pattern": r"^[0-9]+(s|m)$"},
                    "scrapeTimeout": {"type": "string", "pattern": r"^[0-9]+(s|m)$"},
                    "scheme": {"enum": ["http", "https"]},
                    "tlsConfig": {"type": "object", "additionalProperties": False, "properties": {
                        "ca": {"type": "object", "additionalProperties": False, "required": ["secret"], "properties": {
                            "secret": {"type": "object", "additionalProperties": False, "required": ["name", "key"],
                                       "properties": {"name": {"type": "string"}, "key": {"type": "string"}}}}},
                        "serverName": {"type": "string"},
                        "insecureSkipVerify": {"type": "boolean"}}},
                    "relabelings": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False, "required": ["targetLabel"],
                        "properties": {"sourceLabels": {"type": "array", "items": {"type": "string"}},
                                       "targetLabel": {"type": "string"},
                                       "action": {"enum": ["replace", "keep", "drop", "labelmap"]},
                                       "regex": {"type": "string", "format": "regex"},
                                       "replacement": {"type": "string"}}}}}}}}}),
    "TriggerAuthentication": _crd("keda.sh/v1alpha1", "TriggerAuthentication", {
        "type": "object", "required": ["secretTargetRef"], "additionalProperties": False,
        "properties": {"secretTargetRef": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["parameter", "name", "key"], "additionalProperties": False,
            "properties": {"parameter": {"type": "string"}, "name": {"type": "string"}, "key": {"type": "string"}}}}}}),
    "RabbitmqCluster": _crd("rabbitmq.com/v1beta1", "RabbitmqCluster", {
        "type": "object", "required": ["replicas"], "additionalProperties": False,
        "properties": {
            "replicas": {"type": "integer", "minimum": 1},
            "tls": {"type": "object", "additionalProperties": False, "required": ["secretName"],
                    "properties": {"secretName": {"type": "string"}, "caSecretName": {"type": "string"},
                                   "disableNonTLSListeners": {"type": "boolean"}}},
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
                jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]], format_checker=jsonschema.FormatChecker())
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
        refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
        # The management API as KEDA's monitoring-only user (broker-users.yaml), never a process's login.
        assert trigger["metadata"]["protocol"] == "http"
        assert refs["host"]["name"] == "authnotify-broker-keda"
        assert refs["host"]["key"] in secrets[refs["host"]["name"]]["stringData"]
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


def _cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.parametrize(("overlay", "processes"), [("base", 1), ("production", 2)])
def test_the_ingress_runs_its_processes_on_as_many_cores(overlay: str, processes: int,
                                                         request: pytest.FixtureRequest) -> None:
    """AUTHNOTIFY_INGRESS_PROCESSES: one process in the base, two in production with two cores to match."""
    objects = request.getfixturevalue(overlay)
    pod = by_kind(objects, "Deployment")["authnotify-ingress"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["AUTHNOTIFY_INGRESS_PROCESSES"] == str(processes)
    check_settings_values({"AUTHNOTIFY_INGRESS_PROCESSES": env["AUTHNOTIFY_INGRESS_PROCESSES"]},
                          f"{overlay} ingress")
    resources = container["resources"]
    if processes > 1:
        assert _cores(resources["requests"]["cpu"]) == _cores(resources["limits"]["cpu"]) == processes
    else:
        assert _cores(resources["limits"]["cpu"]) <= 1
    # The supervisor's metrics directory is on the writable /tmp.
    assert "/tmp" in {mount["mountPath"] for mount in container["volumeMounts"]}


def test_compose_runs_as_many_ingress_processes_as_the_env_file_says(compose: dict[str, Any]) -> None:
    environment = compose["services"]["ingress"]["environment"]
    assert environment["AUTHNOTIFY_INGRESS_PROCESSES"] == "${AUTHNOTIFY_INGRESS_PROCESSES:-1}"


def test_probes_point_at_readyz_and_healthz_on_the_container_port(base: list[dict[str, Any]]) -> None:
    config = by_kind(base, "ConfigMap")["authnotify-config"]["data"]
    assert int(config["AUTHNOTIFY_HTTP_PORT"]) == INGRESS_PORT
    assert int(config["AUTHNOTIFY_WORKER_HTTP_PORT"]) == WORKER_PORT
    assert int(config["AUTHNOTIFY_API_PORT"]) == API_PORT
    checked = 0
    for obj, container in authnotify_containers(base):
        if obj["kind"] != "Deployment":
            continue
        args = container.get("args", [])
        expected_port = (WORKER_PORT if worker_name(container) or args == ["scheduler"]
                         else API_PORT if args == ["api"] else INGRESS_PORT)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        # The ingress's /metrics has a port of its own (AUTHNOTIFY_METRICS_PORT), never the one Alipay reaches;
        # the workers and the scheduler serve it beside their health, the internal api on its own port.
        ingress = args == ["ingress"]
        assert list(ports.values()) == ([expected_port, METRICS_PORT] if ingress else [expected_port])
        scraped = obj["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
        assert int(scraped) == (METRICS_PORT if ingress else expected_port)
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"),
                            ("startupProbe", "/healthz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{obj['metadata']['name']} {probe}"
            assert ports.get(get["port"], get["port"]) == expected_port, f"{obj['metadata']['name']} {probe}"
        checked += 1
    assert checked == 3 + len(WORKER_TYPES)  # the ingress, the scheduler, the api and the workers


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
                if secret.get("optional"):  # the broker's CA, made with its TLS certificate (production)
                    continue
                files |= {f"{mount['mountPath']}/{key}" for key in secrets[secret["secretName"]]["stringData"]}
        for name, value in env.items():
            if name.endswith(("_PRIVATE_KEY", "_PUBLIC_KEY")):
                assert value.startswith("@") and value[1:] in files, f"{where}: {name}={value}"
            if name == "AUTHNOTIFY_MERCHANTS_FILE":
                assert value in files, where
                # Its `@/path` secrets are files mounted where events are signed, and only there.
                registry = next(secrets[volumes[m["name"]]["secret"]["secretName"]]["stringData"][value.rsplit("/", 1)[1]]
                                for m in container["volumeMounts"] if value.startswith(m["mountPath"] + "/"))
                for reference in re.findall(r'^secrets? = .*?"@([^"]+)"', registry, flags=re.MULTILINE):
                    assert (reference in files) == (worker_name(container) == "merchant-events"), f"{where}: {reference}"

        args = container.get("args", [])
        if args in (["ingress"], ["topology"], ["scheduler"], ["api"]) or worker_name(container):
            scheme = "amqps://" if overlay == "production" else "amqp://"
            assert env["AUTHNOTIFY_RABBITMQ_URL"].startswith(scheme), where
        stores = args in (["migrate"], ["scheduler"], ["api"]) or worker_name(container) in STORE_WORKERS
        if stores:
            assert env["AUTHNOTIFY_DATABASE_URL"].startswith("postgresql+asyncpg://"), where
        # Token keys only where tokens are stored or handed out; the ingress, the scheduler and the merchant
        # deliverer never hold them.
        assert ("AUTHNOTIFY_TOKEN_KEYS" in env) == (worker_name(container) in STORE_WORKERS or args == ["api"]), where
        # The registry: merchant-events delivers with it, the ingress answers consultUnbinding from it.
        assert ("AUTHNOTIFY_MERCHANTS_FILE" in env) == (worker_name(container) == "merchant-events"
                                                        or args == ["ingress"]), where
        assert ("AUTHNOTIFY_API_KEYS_FILE" in env) == (args == ["api"]), where
        if "AUTHNOTIFY_API_KEYS_FILE" in env:
            assert env["AUTHNOTIFY_API_KEYS_FILE"] in files, where


@pytest.mark.parametrize("overlay", ["base", "production"])
def test_scheduler_and_api_run_as_their_own_deployments_and_the_api_is_never_public(
        overlay: str, request: pytest.FixtureRequest) -> None:
    objects = request.getfixturevalue(overlay)
    deployments = by_kind(objects, "Deployment")
    scheduler = deployments["authnotify-scheduler"]
    assert [c["args"] for c in scheduler["spec"]["template"]["spec"]["containers"]] == [["scheduler"]]
    assert scheduler["spec"]["replicas"] >= 2  # safe with several: they claim work with SKIP LOCKED and a lease
    api = deployments["authnotify-api"]
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    assert [c["args"] for c in api["spec"]["template"]["spec"]["containers"]] == [["api"]]
    config = by_kind(objects, "ConfigMap")["authnotify-config"]["data"]
    assert config["AUTHNOTIFY_API_PORT"] != config["AUTHNOTIFY_HTTP_PORT"]  # never the ingress's listener
    service = by_kind(objects, "Service")["authnotify-api"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    policy = by_kind(objects, "NetworkPolicy")["authnotify-api"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert all(source for rule in policy["spec"]["ingress"] for source in rule["from"])  # no open rule
    for service in by_kind(objects, "Service").values():
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    assert "authnotify-api" not in {ingress["metadata"]["name"] for ingress in by_kind(objects, "Ingress").values()}


def _secrets_used(pod: dict[str, Any], container: dict[str, Any]) -> set[str]:
    used = {v["valueFrom"]["secretKeyRef"]["name"] for v in container.get("env", []) if "valueFrom" in v}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret and not secret.get("optional"):
            used.add(secret["secretName"])
    return used


def _process_needs(args: list[str]) -> frozenset[Any]:
    from authnotify.api.server import API_NEEDS
    from authnotify.cli.main import COMMAND_NEEDS
    from authnotify.ingress.server import INGRESS_NEEDS
    from authnotify.scheduler.process import SCHEDULER_NEEDS
    from authnotify.workers.registry import needs_of

    if args == ["ingress"]:
        return INGRESS_NEEDS
    if args == ["scheduler"]:
        return SCHEDULER_NEEDS
    if args == ["api"]:
        return API_NEEDS
    if args[0] == "worker":
        return needs_of(args[1:])
    return COMMAND_NEEDS[args[0]]


@pytest.mark.parametrize("overlay", ["base", "production"])
def test_each_workload_mounts_only_the_secrets_its_process_needs(overlay: str, request: pytest.FixtureRequest) -> None:
    """Issue 6: the merchant-events pods mounted our Alipay RSA keys. What a process may see follows what it
    declares it needs (authnotify.config.needs); the broker URL is always its own user's."""
    from authnotify.config import Need

    secret_of_need = {Need.DATABASE: {"authnotify-app"}, Need.TOKEN_KEYS: {"authnotify-app"},
                      Need.ALIPAY_KEYS: {"authnotify-keys"},
                      Need.MERCHANTS_FILE: {"authnotify-merchants", "authnotify-merchant-secrets"},
                      Need.UNBINDING_FLAGS: {"authnotify-merchants"}, Need.API_KEYS_FILE: {"authnotify-api-keys"}}
    objects = request.getfixturevalue(overlay)
    for obj, container in authnotify_containers(objects):
        pod = pod_spec(obj)
        assert pod is not None
        args = container.get("command", []) + container.get("args", [])
        needs = _process_needs(args)
        allowed = set().union(*(secret_of_need.get(need, set()) for need in needs))
        if Need.BROKER in needs:
            role = worker_name(container) or ("operator" if args[0] in ("topology", "dlq") else args[0])
            allowed.add(f"authnotify-broker-{role}")
        used = _secrets_used(pod, container)
        assert used <= allowed, f"{obj['metadata']['name']} uses {sorted(used - allowed)}"
        if Need.ALIPAY_KEYS in needs:
            assert "authnotify-keys" in used, obj["metadata"]["name"]
        if Need.API_KEYS_FILE in needs:
            assert "authnotify-api-keys" in used, obj["metadata"]["name"]
        if Need.MERCHANTS_FILE in needs:
            assert "authnotify-merchant-secrets" in used, obj["metadata"]["name"]
    # Every process is covered: the ingress, each worker, the scheduler, the api, the Jobs.
    commands = {tuple(c.get("command", []) + c.get("args", [])) for _, c in authnotify_containers(objects)}
    assert commands >= {("ingress",), ("scheduler",), ("api",), *(("worker", w) for w in WORKER_TYPES)}


def test_rabbitmq_cluster_of_three_with_quorum_queues(base: list[dict[str, Any]]) -> None:
    (cluster,) = by_kind(base, "RabbitmqCluster").values()
    assert cluster["spec"]["replicas"] == 3
    assert "default_queue_type = quorum" in cluster["spec"]["rabbitmq"]["additionalConfig"]
    assert by_kind(base, "ConfigMap")["authnotify-config"]["data"]["AUTHNOTIFY_QUEUE_TYPE"] == "quorum"
    # The processes and KEDA reach the cluster through the Service the operator names after it.
    for role in BROKER_ROLES:
        url = by_kind(base, "Secret")[f"authnotify-broker-{role}"]["stringData"]["rabbitmq-url"]
        assert re.match(rf"amqp://authnotify-{role}:[^@]+@{cluster['metadata']['name']}\.authnotify\.svc:5672/$", url)


def test_migration_job_and_postgres(base: list[dict[str, Any]], production: list[dict[str, Any]]) -> None:
    job = by_kind(base, "Job")["authnotify-migrate"]
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
    assert len(images) == 1 and re.search(r"@sha256:[0-9a-f]{64}$", images.pop())


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
    expected = {"ingress": ["ingress"], "migrate": ["migrate"], "scheduler": ["scheduler"], "api": ["api"]}
    expected |= {f"worker-{name}": ["worker", name] for name in WORKER_TYPES}
    assert set(services) == set(expected) | {"rabbitmq", "postgres"}
    for name, command in expected.items():
        assert services[name]["command"] == command, name
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / services[name]["build"]["context"] / "deploy" / "Dockerfile").is_file()
    assert re.fullmatch(r"rabbitmq:3\.1[3-9]-management@sha256:[0-9a-f]{64}", services["rabbitmq"]["image"])
    assert re.fullmatch(r"postgres:16@sha256:[0-9a-f]{64}", services["postgres"]["image"])
    assert services["ingress"]["ports"] == ["${AUTHNOTIFY_PUBLISH_PORT:-8080}:8080"]
    # The internal API is reachable on the host's loopback only.
    assert services["api"]["ports"] == [f"127.0.0.1:{API_PORT}:{API_PORT}"]
    assert "ports" not in services["scheduler"]


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


def test_compose_gives_each_container_only_what_its_process_needs(compose: dict[str, Any]) -> None:
    """Issue 6: compose gave every container every secret (the whole .env and every key file)."""
    from authnotify.config import Need

    variables_of_need = {
        Need.BROKER: {"AUTHNOTIFY_RABBITMQ_URL"}, Need.DATABASE: {"AUTHNOTIFY_DATABASE_URL"},
        Need.TOKEN_KEYS: {"AUTHNOTIFY_TOKEN_KEYS"}, Need.MERCHANTS_FILE: {"AUTHNOTIFY_MERCHANTS_FILE"},
        Need.UNBINDING_FLAGS: {"AUTHNOTIFY_MERCHANTS_FILE"}, Need.API_KEYS_FILE: {"AUTHNOTIFY_API_KEYS_FILE"},
        Need.ALIPAY_KEYS: {f"AUTHNOTIFY_{p}_{k}" for p in ("AMS", "APS") for k in ("PRIVATE_KEY", "ALIPAY_PUBLIC_KEY")},
    }
    secret_files = {Need.ALIPAY_KEYS: {"ams_private_key", "ams_alipay_public_key", "aps_private_key",
                                       "aps_alipay_public_key"}, Need.MERCHANTS_FILE: {"merchants", "merchant_secret_default"},
                    Need.UNBINDING_FLAGS: {"merchants"}, Need.API_KEYS_FILE: {"api_keys"}}
    secret_variables = set().union(*variables_of_need.values())
    for name, service in compose["services"].items():
        if name in ("rabbitmq", "postgres"):
            continue
        assert "env_file" not in service, f"{name} would get the whole .env"
        needs = _process_needs(service["command"])
        environment = set(service.get("environment", {}))
        allowed = set().union(*(variables_of_need.get(need, set()) for need in needs))
        assert environment & secret_variables == allowed, name
        mounted = {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}
        assert mounted == set().union(*(secret_files.get(need, set()) for need in needs)), name


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
@pytest.mark.parametrize("command", [["ingress"], ["worker", "token-created"], ["scheduler"], ["api"]])
def test_healthcheck_probes_the_port_of_the_process_it_runs_beside(
        command: list[str], health_server: http.server.HTTPServer, tmp_path: Path) -> None:
    """The image's HEALTHCHECK, run for real with /proc/1/cmdline stood in by a file."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"\0".join([b"/opt/authnotify/bin/python", b"/opt/authnotify/bin/authnotify",
                                    *(part.encode() for part in command)]) + b"\0")
    program = healthcheck_program().replace("/proc/1/cmdline", str(cmdline))
    port = str(health_server.server_address[1])
    is_worker = command[0] in ("worker", "scheduler")
    own, other = (("AUTHNOTIFY_WORKER_HTTP_PORT", "AUTHNOTIFY_HTTP_PORT") if is_worker
                  else ("AUTHNOTIFY_API_PORT", "AUTHNOTIFY_HTTP_PORT") if command == ["api"]
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


# --- the broker as a trust boundary, what reaches whom, what is exposed (issues 9 and 10) ---------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present = labels.get(expression["key"])
        if expression["operator"] == "In" and present not in expression["values"]:
            return False
        if expression["operator"] == "NotIn" and present in expression["values"]:
            return False
    return True


def _workloads(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Pod labels of every workload, by name (the operator labels RabbitMQ's pods with the cluster's name)."""
    pods = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"] for o in objects if pod_spec(o)}
    for cluster in by_kind(objects, "RabbitmqCluster"):
        pods[cluster] = {"app.kubernetes.io/name": cluster}
    return pods


def _egress(objects: list[dict[str, Any]], labels: dict[str, str]) -> list[tuple[str, tuple[int, ...]]]:
    """Where pods with these labels may connect: ("pods:<name label>" | "cidr:<block>" | "dns" |
    "namespace:<name>", ports)."""
    allowed = []
    for policy in by_kind(objects, "NetworkPolicy").values():
        if "Egress" not in policy["spec"].get("policyTypes", []) or not _selects(policy["spec"]["podSelector"], labels):
            continue
        for rule in policy["spec"].get("egress", []):
            ports = tuple(sorted(p["port"] for p in rule.get("ports", [])))
            for peer in rule.get("to", [{}]):
                if "ipBlock" in peer:
                    allowed.append((f"cidr:{peer['ipBlock']['cidr']}", ports))
                elif peer.get("podSelector", {}).get("matchLabels", {}).get("k8s-app") == "kube-dns":
                    allowed.append(("dns", ports))
                elif "podSelector" in peer:
                    name = peer["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name", "any")
                    allowed.append((f"pods:{name}", ports))
                elif "namespaceSelector" in peer:
                    name = peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name", "any")
                    allowed.append((f"namespace:{name}", ports))
                else:
                    allowed.append(("anywhere", ports))
    return allowed


@pytest.mark.parametrize("overlay", ["base", "production"])
def test_network_policies_deny_by_default_and_open_only_what_each_workload_uses(
        overlay: str, request: pytest.FixtureRequest) -> None:
    objects = request.getfixturevalue(overlay)
    policies = by_kind(objects, "NetworkPolicy")
    deny = policies["authnotify-default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    rabbit, postgres = "pods:authnotify-rabbitmq", "pods:authnotify-postgres"
    managed = overlay == "production"
    for name, labels in _workloads(objects).items():
        own = [p for p in policies.values()
               if p["metadata"]["name"] not in ("authnotify-default-deny", "authnotify-dns")
               and _selects(p["spec"]["podSelector"], labels)]
        assert own, f"no NetworkPolicy lets {name} do anything"
        egress = _egress(objects, labels)
        if labels.get("app.kubernetes.io/name") == "authnotify":  # traces go to the collector, OTLP only
            assert ("namespace:monitoring", (4317, 4318)) in egress, name
        assert {ports for target, ports in egress if target.startswith("namespace:")} <= {(4317, 4318)}, name
        targets = {target for target, _ in egress} - {"dns", "namespace:monitoring"}
        component = labels.get("app.kubernetes.io/component", "")
        database = {"cidr:10.20.30.0/24"} if managed else {postgres}
        internet = "cidr:0.0.0.0/0"
        expected = {
            "ingress": {rabbit},
            "worker-authcode-created": {rabbit, internet} | database,
            "worker-token-created": {rabbit} | database,
            "worker-token-canceled": {rabbit} | database,
            "worker-token-refresh": {rabbit, internet} | database,
            "worker-revocations": {rabbit, internet} | database,
            "worker-merchant-events": {rabbit, internet},
            "scheduler": {rabbit} | database,
            "api": {rabbit} | database,
            "migrate": database,
            "topology": {rabbit},
        }.get(component)
        if name.startswith("authnotify-") and name not in ("authnotify-rabbitmq", "authnotify-postgres"):
            assert expected is not None, f"{name}: no expectation for component {component!r}"
        if expected is not None:
            assert targets == expected, f"{name} may reach {sorted(targets)}"
    # Alipay's gateway only from the workers that call it (HTTPS only), the merchants only from merchant-events.
    for name, labels in _workloads(objects).items():
        component = labels.get("app.kubernetes.io/component", "")
        on_443 = {ports for target, ports in _egress(objects, labels) if target == "cidr:0.0.0.0/0"}
        if component in {f"worker-{worker}" for worker in ALIPAY_WORKERS}:
            assert on_443 == {(443,)}, f"{name} reaches the outside world on {sorted(on_443)}"
        elif component != "worker-merchant-events":
            assert not on_443, f"{name} may reach the outside world"
    # The outside world only on HTTPS (Alipay) or HTTP(S) (merchants), never the cluster's private ranges.
    for policy in ("authnotify-alipay-egress", "authnotify-merchant-egress"):
        (rule,) = policies[policy]["spec"]["egress"]
        assert "10.0.0.0/8" in rule["to"][0]["ipBlock"]["except"]
        assert {p["port"] for p in rule["ports"]} <= {80, 443}


def test_one_broker_user_per_role_with_the_narrowest_permissions(base: list[dict[str, Any]]) -> None:
    """Issue 9: one full-privilege login was shared by every pod and KEDA; with it anyone could forge
    TOKEN_CREATED. Now each role's regexes are checked against the real queue and exchange names."""
    from authnotify.config import Settings
    from authnotify.messaging.topology import build_topology

    topology = build_topology(Settings(_env_file=None))  # type: ignore[call-arg]
    names = [*topology.all_queue_names(), *(spec.name for spec in topology.exchanges()), "amq.default"]
    users = by_kind(base, "User")
    permissions = {p["spec"]["userReference"]["name"]: p["spec"]["permissions"] for p in by_kind(base, "Permission").values()}
    secrets = by_kind(base, "Secret")
    assert set(users) == set(permissions) == {f"authnotify-{role}" for role in (*BROKER_ROLES, "keda")}

    def allowed(role: str, part: str) -> set[str]:
        return {name for name in names if re.search(permissions[f"authnotify-{role}"][part], name)}

    for role in (*BROKER_ROLES, "keda"):
        user = users[f"authnotify-{role}"]["spec"]
        credentials = secrets[user["importCredentialsSecret"]["name"]]["stringData"]
        assert credentials["username"] == f"authnotify-{role}"
        url = credentials.get("rabbitmq-url") or credentials["management-url"]
        assert f"//authnotify-{role}:" in url  # the process logs in as its own user
    notifications, unrouted = topology.notifications_exchange, topology.unrouted_exchange
    assert allowed("ingress", "write") == {notifications, unrouted}
    assert allowed("ingress", "read") == allowed("ingress", "configure") == set()
    for worker in WORKER_TYPES:
        own = {topology.consumer_queue(worker)}
        assert allowed(worker, "read") == allowed(worker, "configure") == own
    assert notifications not in allowed("merchant-events", "write")  # cannot forge a notification
    assert allowed("merchant-events", "write") == {"amq.default"}
    for worker in set(WORKER_TYPES) - {"merchant-events"}:  # retries and dead letters, events to merchants
        assert allowed(worker, "write") == {"amq.default", notifications, unrouted}, worker
    for publisher in PUBLISHERS:  # commands and events through the notifications exchange, nothing else
        assert allowed(publisher, "write") == {notifications, unrouted}, publisher
        assert allowed(publisher, "read") == allowed(publisher, "configure") == set(), publisher
    assert allowed("keda", "read") == allowed("keda", "write") == allowed("keda", "configure") == set()
    assert users["authnotify-keda"]["spec"]["tags"] == ["monitoring"]
    assert set(allowed("operator", "configure")) == set(names) - {"amq.default"}


def test_production_talks_to_the_broker_over_tls_only(production: list[dict[str, Any]]) -> None:
    (cluster,) = by_kind(production, "RabbitmqCluster").values()
    assert cluster["spec"]["tls"]["disableNonTLSListeners"] is True
    secrets = by_kind(production, "Secret")
    for role in BROKER_ROLES:
        assert secrets[f"authnotify-broker-{role}"]["stringData"]["rabbitmq-url"].startswith("amqps://")
    assert secrets["authnotify-broker-keda"]["stringData"]["management-url"].startswith("https://")


def test_the_kubernetes_ingress_routes_only_the_paths_alipay_calls(base: list[dict[str, Any]]) -> None:
    """/metrics once answered on the Alipay-facing port. Outside, only the paths Alipay calls exist: the two
    notify paths and Alipay+'s consultUnbinding."""
    from authnotify.alipay.notifications import CONSULT_UNBINDING_PATH, NOTIFY_PATHS

    (route,) = by_kind(base, "Ingress").values()
    paths = [path for rule in route["spec"]["rules"] for path in rule["http"]["paths"]]
    assert sorted(p["path"] for p in paths) == sorted([*NOTIFY_PATHS.values(), CONSULT_UNBINDING_PATH])
    assert {p["pathType"] for p in paths} == {"Exact"}
    assert {(p["backend"]["service"]["name"], p["backend"]["service"]["port"]["name"]) for p in paths} == {
        ("authnotify-ingress", "http")}
    service = by_kind(base, "Service")["authnotify-ingress"]
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]  # not the metrics port


def test_alerts_watch_unrouted_and_the_dead_letter_queues(base: list[dict[str, Any]]) -> None:
    (rule,) = by_kind(base, "PrometheusRule").values()
    alerts = {r["alert"]: r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]}
    assert 'queue="authnotify.unrouted"' in alerts["AuthnotifyUnroutedNotEmpty"]
    assert ".dead" in alerts["AuthnotifyDeadLettersGrowing"]
    (cluster,) = by_kind(base, "RabbitmqCluster").values()
    assert "prometheus.return_per_object_metrics = true" in cluster["spec"]["rabbitmq"]["additionalConfig"]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("overlay", ["base", "production"])
def test_every_process_s_metrics_port_is_scraped_by_a_service_monitor(overlay: str,
                                                                      request: pytest.FixtureRequest) -> None:
    objects = request.getfixturevalue(overlay)
    services = by_kind(objects, "Service")
    monitors = by_kind(objects, "ServiceMonitor")
    scraped: dict[str, set[int]] = {}  # Deployment name -> container ports scraped
    for monitor in monitors.values():
        selected = [s for s in services.values() if _matches(monitor["spec"]["selector"]["matchLabels"],
                                                            s["metadata"].get("labels", {}))]
        if monitor["metadata"]["name"] == "authnotify-rabbitmq":
            assert not selected  # the cluster operator's Service, not one of these manifests
            # With TLS that Service has prometheus-tls (15691, HTTPS) instead of prometheus (15692).
            (endpoint,) = monitor["spec"]["endpoints"]
            if overlay == "production":
                assert (endpoint["port"], endpoint["scheme"]) == ("prometheus-tls", "https")
                assert endpoint["tlsConfig"]["ca"]["secret"] == {"name": "authnotify-rabbitmq-tls", "key": "ca.crt"}
                assert not endpoint["tlsConfig"].get("insecureSkipVerify")
            else:
                assert endpoint["port"] == "prometheus" and endpoint.get("scheme", "http") == "http"
            continue
        assert len(selected) == 1, f"{monitor['metadata']['name']} selects {[s['metadata']['name'] for s in selected]}"
        (service,) = selected
        for endpoint in monitor["spec"]["endpoints"]:
            (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
            assert endpoint["path"] == "/metrics"
            for deployment in by_kind(objects, "Deployment").values():
                template = deployment["spec"]["template"]
                if not _matches(service["spec"]["selector"], template["metadata"]["labels"]):
                    continue
                for container in template["spec"]["containers"]:
                    for container_port in container.get("ports", []):
                        if container_port["name"] == port["targetPort"]:
                            scraped.setdefault(deployment["metadata"]["name"], set()).add(container_port["containerPort"])
    expected = {"authnotify-ingress": {9091}, "authnotify-scheduler": {9090}, "authnotify-api": {8088}}
    expected |= {f"authnotify-worker-{name}": {9090} for name in
                 ("authcode-created", "token-created", "token-canceled", "token-refresh", "revocations", "merchant-events")}
    assert scraped == expected
    # The scrape Services are headless and never the ingress's public one.
    for name in ("authnotify-ingress-metrics", "authnotify-workers-metrics", "authnotify-scheduler-metrics"):
        assert services[name]["spec"]["clusterIP"] == "None"
    assert [p["targetPort"] for p in services["authnotify-ingress"]["spec"]["ports"]] == ["http"]


@pytest.mark.parametrize("overlay", ["base", "production"])
def test_images_are_pinned_by_digest(overlay: str, request: pytest.FixtureRequest) -> None:
    objects = request.getfixturevalue(overlay)
    images = [c["image"] for o in objects for c in _containers(o)]
    images += [c["spec"]["image"] for c in by_kind(objects, "RabbitmqCluster").values()]
    for image in images:
        if overlay == "base" and image.split(":")[0] == "authnotify":
            continue  # the overlay names the registry and the digest of the release
        assert re.search(r"@sha256:[0-9a-f]{64}$", image), image


def test_the_image_installs_the_locked_dependencies_hash_checked_and_nothing_else() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    runs = [args for op, args in dockerfile_instructions() if op == "RUN" and "pip install" in args]
    locked_install = next(run for run in runs if "requirements.lock" in run)
    assert "--require-hashes" in locked_install and "--no-deps" in locked_install
    package_install = next(run for run in runs if " . " in f"{run} ")
    assert all(flag in package_install for flag in ("--no-deps", "--no-index", "--no-build-isolation"))

    lock = (DEPLOY / "requirements.lock").read_text()
    entries = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)[^\n]*\\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", lock,
                         re.MULTILINE)
    pinned = {canonicalize_name(name): version for name, version, _ in entries}
    assert len(pinned) == lock.count("=="), "every pinned line carries its hashes"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [Requirement(text) for text in project["project"]["dependencies"]]
    wanted += [Requirement(text) for text in project["build-system"]["requires"]]
    wanted += [Requirement(text) for text in project["project"]["optional-dependencies"]["otel"]]  # tracing, in the image
    for requirement in wanted:
        version = pinned.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is not in deploy/requirements.lock (run make lock)"
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement} vs locked {version}"
