"""Deployment files: the offline checks (scripts/check_deploy.sh) and the contracts between them.

No Docker engine or cluster runs here: images are never built. These tests check what can be
checked without one: the linters and schema validators (through check_deploy.sh), and that the
files agree with each other and with the server (ports, paths, probes, labels, metric names).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
sys.path.insert(0, str(DEPLOY / "docker"))
import requirements_from_pyproject as rfp  # noqa: E402

# DESIGN.md §6, and the sample names a scrape of them yields.
DESIGN_METRICS = {
    "mtserve_requests": "counter",
    "mtserve_request_duration_seconds": "histogram",
    "mtserve_queue_duration_seconds": "histogram",
    "mtserve_preprocess_duration_seconds": "histogram",
    "mtserve_segment_duration_seconds": "histogram",
    "mtserve_batch_size": "histogram",
    "mtserve_batch_tasks": "histogram",
    "mtserve_queue_depth": "gauge",
    "mtserve_model_info": "gauge",
}
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
DESIGN_SAMPLES = {n + s for n, t in DESIGN_METRICS.items() for s in SAMPLE_SUFFIXES[t]}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    stages: dict[str, list[str]] = {}
    name = None
    for line in lines:
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            name = m.group(1)
            stages[name] = [line]
        elif name:
            stages[name].append(line)
    return stages


def k8s_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def pod_spec() -> dict:
    (deploy,) = k8s_docs(K8S / "base/deployment.yaml")
    return deploy["spec"]["template"]["spec"]


# ---------------------------------------------------------------------------------------------
# the offline checks
# ---------------------------------------------------------------------------------------------
def test_check_deploy_script() -> None:
    """hadolint, compose config -q, kustomize + kubernetes-validate --strict, dashboard PromQL."""
    if not shutil.which("bash"):
        pytest.skip("bash not available")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/check_deploy.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode == 3:
        pytest.skip(f"deployment check tools could not be installed:\n{output[-2000:]}")
    assert proc.returncode == 0, output[-6000:]
    for what in (
        "hadolint Dockerfile",
        "docker compose config -q",
        "kubernetes-validate",
        "dashboard PromQL",
    ):
        assert what in output, f"check_deploy.sh did not run {what!r}:\n{output[-3000:]}"


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------
def test_dockerfile_targets() -> None:
    stages = dockerfile_stages()
    assert {"serve", "serve-gpu", "train"} <= set(stages)
    for target in ("serve", "serve-gpu"):
        text = "\n".join(stages[target])
        user = [line for line in stages[target] if line.startswith("USER ")]
        assert user and not re.search(r"USER\s+(root|0)\b", user[-1]), f"{target} runs as root"
        assert "HEALTHCHECK" in text and "mtserve-healthcheck" in text
        assert "EXPOSE 8000" in text
        assert "/models/bundle" in stages[target][-1], "CMD serves the documented bundle path"
    assert "/healthz" in (DEPLOY / "docker/healthcheck.py").read_text()
    assert "nvidia/cuda" in DOCKERFILE.read_text() and "cudnn-runtime" in DOCKERFILE.read_text()


def test_dependency_layers_before_code() -> None:
    """Each image installs its dependencies from pyproject.toml before the code (the wheel) comes in."""
    stages = dockerfile_stages()
    for target in ("serve", "serve-gpu", "train"):
        lines = stages[target]
        deps = next(
            i for i, line in enumerate(lines) if "requirements-from-pyproject /tmp/pyproject.toml" in line
        )
        code = next(i for i, line in enumerate(lines) if "from=wheel" in line)
        assert deps < code, target
        # Nothing but pyproject.toml (and the small helper scripts) is copied before the deps.
        for line in lines[:deps]:
            if line.startswith("COPY"):
                assert "pyproject.toml" in line or "deploy/docker/" in line, line
    # The exporter verifies ONNX against torch in onnxruntime: the train image needs `serve` too.
    assert any("pyproject.toml train serve" in line for line in stages["train"])
    wheel = "\n".join(stages["wheel"])
    for pkg in ("models", "service", "training"):
        assert f"COPY {pkg} " in wheel


def test_gpu_base_matches_onnxruntime_gpu() -> None:
    """onnxruntime-gpu >= 1.27 is built for CUDA 13 (1.19-1.26: CUDA 12); cuDNN 9 for both."""
    text = DOCKERFILE.read_text()
    cuda = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu[\d.]+", text)
    ort = re.search(r"ARG ORT_GPU_VERSION=1\.(\d+)\.\d+", text)
    assert cuda and ort
    expected_cuda = 13 if int(ort.group(1)) >= 27 else 12
    assert int(cuda.group(1)) == expected_cuda


def test_requirements_from_pyproject() -> None:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = lambda reqs: {rfp.requirement_name(r) for r in reqs}  # noqa: E731
    serve = names(rfp.requirements(pyproject, ["serve"]))
    gpu = names(rfp.requirements(pyproject, ["gpu"]))
    train = names(rfp.requirements(pyproject, ["train"]))
    assert "onnxruntime" in serve and "fastapi" in serve and "uvicorn" in serve
    assert not serve & {"torch", "torchvision", "timm", "onnxruntime-gpu"}, (
        "the CPU server image stays torch-free"
    )
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu, "exactly one onnxruntime per environment"
    assert not gpu & {"torch", "timm"}
    assert {"torch", "timm", "onnx"} <= train
    assert names(rfp.requirements(pyproject, ["train"], only=["torch", "torchvision"])) == {
        "torch",
        "torchvision",
    }
    with pytest.raises(KeyError):
        rfp.requirements(pyproject, ["no-such-extra"])


def test_dockerignore() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for excluded in (".git", ".venv", "tests", "**/*.onnx", "bundles", "runs", "data", ".env"):
        assert excluded in patterns, excluded
    for needed in ("pyproject.toml", "README.md", "models", "service", "training"):
        assert needed not in patterns, needed
    assert "deploy/*" in patterns and "!deploy/docker" in patterns


def test_demo_bundle_script_is_idempotent(tmp_path: Path) -> None:
    """With a manifest already there, build-demo-bundle exits 0 without calling mtserve."""
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    env = dict(os.environ, PATH="/usr/bin:/bin")  # no mtserve on PATH: it must not be needed
    proc = subprocess.run(
        ["sh", str(DEPLOY / "docker/build-demo-bundle.sh"), str(out)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout


# ---------------------------------------------------------------------------------------------
# compose
# ---------------------------------------------------------------------------------------------
def test_compose_services_and_ports() -> None:
    c = compose()
    services = c["services"]
    assert {"mtserve", "bundle-builder", "prometheus", "grafana"} <= set(services)
    # Everything binds to loopback unless MTSERVE_BIND says otherwise.
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("${MTSERVE_BIND:-127.0.0.1}:"), f"{name}: {port}"
    assert (
        services["mtserve"]["depends_on"]["bundle-builder"]["condition"] == "service_completed_successfully"
    )
    assert services["bundle-builder"]["build"]["target"] == "train"
    assert services["mtserve"]["build"]["target"] == "serve"
    assert any(v.endswith(":/models:ro") for v in services["mtserve"]["volumes"])
    assert "models" in c["volumes"]
    # The Grafana password comes from a variable with a documented default.
    assert "${GRAFANA_ADMIN_PASSWORD:-admin}" in str(services["grafana"]["environment"])
    # Bind-mounted config files exist.
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume


def test_compose_gpu_override() -> None:
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["mtserve"]
    assert gpu["build"]["target"] == "serve-gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["environment"]["MTSERVE_DEVICE"] == "cuda"


def test_prometheus_scrapes_mtserve() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "mtserve")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["mtserve:8000"]


# ---------------------------------------------------------------------------------------------
# Grafana
# ---------------------------------------------------------------------------------------------
def test_dashboard_uses_design_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana/dashboards/mtserve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bmtserve_\w+", e)}
    assert used <= DESIGN_SAMPLES, used - DESIGN_SAMPLES
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("requests per second by task", "p50 / p99", "batch size per segment",
                   "tasks per shared-trunk batch", "queue depth", "errors by code"):  # fmt: skip
        assert needed in titles, needed
    assert any("histogram_quantile(0.99" in e for e in exprs)
    assert any("histogram_quantile(0.5" in e for e in exprs)


def test_dashboard_promql_parses() -> None:
    promql_parser = pytest.importorskip("promql_parser")
    dash = json.loads((DEPLOY / "grafana/dashboards/mtserve.json").read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m")
            promql_parser.parse(re.sub(r"\$\{?(\w+)\}?", ".*", expr))


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------
def test_deployment_probes_ports_and_scrape() -> None:
    spec = pod_spec()
    (container,) = spec["containers"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert port == 8000
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert "/models/bundle" in container["args"]
    (deploy,) = k8s_docs(K8S / "base/deployment.yaml")
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert "replicas" not in deploy["spec"], "the HPA owns the replica count"


def test_selectors_agree() -> None:
    (deploy,) = k8s_docs(K8S / "base/deployment.yaml")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    selectors = [deploy["spec"]["selector"]["matchLabels"]]
    (service,) = k8s_docs(K8S / "base/service.yaml")
    selectors.append(service["spec"]["selector"])
    (pdb,) = k8s_docs(K8S / "base/pdb.yaml")
    selectors.append(pdb["spec"]["selector"]["matchLabels"])
    for sel in selectors:
        assert sel.items() <= pod_labels.items(), sel
    (sm,) = k8s_docs(K8S / "components/servicemonitor/servicemonitor.yaml")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    (hpa,) = k8s_docs(K8S / "base/hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mtserve"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    (claim,) = k8s_docs(K8S / "base/pvc.yaml")
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_queue_depth_variant() -> None:
    component = yaml.safe_load((K8S / "components/hpa-queue-depth/kustomization.yaml").read_text())
    (patch,) = component["patches"]
    (op,) = yaml.safe_load(patch["patch"])
    pods = next(m for m in op["value"] if m["type"] == "Pods")
    assert pods["pods"]["metric"]["name"] == "mtserve_queue_depth"
    values = yaml.safe_load((K8S / "components/hpa-queue-depth/prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == "mtserve_queue_depth"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_gpu_overlay() -> None:
    overlay = yaml.safe_load((K8S / "overlays/gpu/kustomization.yaml").read_text())
    assert {"name": "mtserve", "newTag": "0.1.0-gpu"} in overlay["images"]
    (patch,) = [d for d in k8s_docs(K8S / "overlays/gpu/deployment-gpu.yaml")]
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "cuda" in container["args"]


@pytest.mark.skipif(not (shutil.which("kustomize") or shutil.which("kubectl")), reason="no kustomize/kubectl")
def test_kustomize_renders_overlays() -> None:
    cmd = ["kustomize", "build"] if shutil.which("kustomize") else ["kubectl", "kustomize"]
    for overlay in ("", "base", "overlays/gpu", "overlays/queue-depth"):
        out = subprocess.run([*cmd, str(K8S / overlay)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        kinds = {d["kind"] for d in yaml.safe_load_all(out.stdout) if d}
        assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds, overlay
        if overlay == "overlays/queue-depth":
            assert "ServiceMonitor" in kinds


def test_docs_mention_ports_and_credentials() -> None:
    doc = (ROOT / "docs/deploy.md").read_text()
    for needed in ("127.0.0.1", "8000", "9090", "3000", "GRAFANA_ADMIN_PASSWORD", "/models/bundle",
                   "kubectl apply -k", "estimate"):  # fmt: skip
        assert needed in doc, needed


def test_demo_bundle_script_flow(tmp_path: Path) -> None:
    """data demo -> train -> export into a temporary name, then renamed into place (a stub mtserve)."""
    stub = tmp_path / "bin/mtserve"
    stub.parent.mkdir()
    log = tmp_path / "calls.log"
    stub.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'if [ "$1" = export ]; then mkdir -p "$4" && echo "{}" > "$4/manifest.json"; fi\n'
    )
    stub.chmod(0o755)
    config = tmp_path / "demo.yaml"
    config.write_text("tasks: {}\n")
    out = tmp_path / "models/bundle"
    out.mkdir(parents=True)  # an empty directory is fine
    env = dict(os.environ, PATH=f"{stub.parent}:/usr/bin:/bin", MTSERVE_DEMO_CONFIG=str(config))
    script = str(DEPLOY / "docker/build-demo-bundle.sh")
    proc = subprocess.run(["sh", script, str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = [line.split() for line in log.read_text().splitlines()]
    assert [c[:2] for c in calls] == [["data", "demo"], ["train", "--config"], ["export", calls[2][1]]]
    assert calls[1][2].endswith("training/configs/demo.yaml")
    assert (out / "manifest.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"], "no partial bundle left behind"
    # A second run finds the bundle and does nothing.
    proc = subprocess.run(["sh", script, str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout
    assert len(log.read_text().splitlines()) == 3
    # A non-empty directory without a manifest is refused rather than overwritten.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "junk").write_text("x")
    proc = subprocess.run(["sh", script, str(broken)], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "refusing" in proc.stderr
