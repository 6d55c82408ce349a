"""deploy/k8s and deploy/compose.yaml, validated offline.

Overlays are rendered by a small kustomize written here in Python (resources, labels, images,
namespace, strategic-merge patches: what the overlays use), since no kustomize can be installed
offline on a fresh machine; where `kubectl kustomize` is installed its output is compared with
it. Every rendered manifest is validated against the Kubernetes 1.37 schemas shipped in the
`kubernetes-validate` wheel (strict: unknown fields refused), the Prometheus Operator kinds
against schemas in deploy/k8s/schemas. Then what ties the pieces together is checked: the
sidecar's settings and the tap's environment name real settings, probes ask for the service the
sidecar reports health on, the socket path is on the volume both containers share, the
PrometheusRule is rules.yml.
"""

from __future__ import annotations

import base64
import copy
import json
import shutil
import subprocess
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
SCHEMAS = {
    "ServiceMonitor": K8S / "schemas" / "servicemonitor-monitoring-v1.json",
    "PrometheusRule": K8S / "schemas" / "prometheusrule-monitoring-v1.json",
}
JOB = "misalign-sidecar"

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


def validate(doc: Doc) -> None:
    if doc["kind"] in SCHEMAS:
        schema = json.loads(SCHEMAS[doc["kind"]].read_text())
        jsonschema.Draft202012Validator(schema).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_python_kustomize_overlay_manifests_validate_against_k8s_schemas(overlay: str) -> None:
    docs = rendered(overlay)
    kinds = sorted(k for k, _ in docs)
    for needed in ("Deployment", "Service", "ConfigMap", "ServiceMonitor", "PrometheusRule"):
        assert needed in kinds
    for doc in docs.values():
        validate(doc)


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
    rule = copy.deepcopy(docs["PrometheusRule", "misalign-monitor"])
    rule["spec"]["groups"][1]["rules"][0]["for"] = "ten minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate(rule)
    monitor = copy.deepcopy(docs["ServiceMonitor", JOB])
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed here"
)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_python_kustomize_matches_kubectl_kustomize(overlay: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
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

    # Probes ask for the service the sidecar reports health on, on its gRPC port.
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"grpc": loaded.grpc_port, "metrics": loaded.metrics_port}
    for probe in ("readinessProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"] == {"port": loaded.grpc_port, "service": SERVICE_NAME}

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
