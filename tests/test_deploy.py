"""Deployment files: the offline checks (scripts/check_deploy.sh) and the contracts between them.

No Docker engine or cluster runs here: images are never built. These tests check what can be
checked without one: the linters and schema validators (through check_deploy.sh), and that the
files agree with each other and with the server (ports, paths, probes, labels, metric names).
"""

from __future__ import annotations

import argparse
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
        # Settings come from the environment: the bundle path is MTSERVE_BUNDLE, and CMD passes no
        # flags (flags win over MTSERVE_* variables, so a flag in CMD would silently ignore them).
        assert re.search(r"ENV .*MTSERVE_BUNDLE=/models/bundle", text), target
        assert stages[target][-1] == 'CMD ["serve"]', stages[target][-1]
    assert "/healthz" in (DEPLOY / "docker/healthcheck.py").read_text()
    assert "nvidia/cuda" in DOCKERFILE.read_text() and "cudnn-runtime" in DOCKERFILE.read_text()


def test_dockerfile_needs_no_frontend_image() -> None:
    """No `# syntax=` line: the engine's built-in BuildKit frontend builds it, offline too."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.I | re.M)
    assert "BuildKit" in text and "BuildKit" in (ROOT / "docs/deploy.md").read_text()


def test_images_user_and_group_10001() -> None:
    """uid and gid 10001 both have an entry (groupadd --gid), and every image runs as them."""
    text = DOCKERFILE.read_text()
    assert "ARG APP_UID=10001" in text and "ARG APP_GID=10001" in text
    assert "--user-group" not in text, "useradd --user-group picks a system gid (999), not 10001"
    stages = dockerfile_stages()
    for target in ("serve", "serve-gpu", "train"):
        lines = stages[target]
        create = next(line for line in lines if "useradd" in line)
        assert 'groupadd --system --gid "${APP_GID}" mtserve' in create, target
        assert '--uid "${APP_UID}" --gid "${APP_GID}"' in create, target
        assert [line for line in lines if line.startswith("USER ")][-1] == "USER ${APP_UID}:${APP_GID}", (
            target
        )


def test_onnxruntime_telemetry_off_in_images() -> None:
    stages = dockerfile_stages()
    for target in ("base", "serve-gpu"):
        assert any("ORT_DISABLE_TELEMETRY=1" in line for line in stages[target] if line.startswith("ENV")), (
            target
        )


def test_serve_cli_disables_onnxruntime_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mtserve serve` turns onnxruntime's telemetry off before it builds the app."""
    ort = pytest.importorskip("onnxruntime")
    import service.serve_cli as serve_cli

    calls: list[str] = []
    monkeypatch.setattr(ort, "disable_telemetry_events", lambda: calls.append("off"))

    def stop(*_a, **_k):
        raise SystemExit("stop before the server starts")

    monkeypatch.setattr("service.app.create_app", stop)
    monkeypatch.setenv("MTSERVE_BUNDLE", "/nonexistent/bundle")
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "")  # recorded, so the test's own change is undone
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY")
    args = argparse.ArgumentParser()
    serve_cli.add_arguments(args)
    with pytest.raises(SystemExit):
        serve_cli.run(args.parse_args([]))
    assert calls == ["off"]
    # The variable is read when onnxruntime is first imported: set for a server started from a
    # plain pip install too (the images set it in their ENV).
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"


def test_serve_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mtserve serve` with no positional takes the bundle (and host, port...) from MTSERVE_*, as
    the images' CMD ["serve"] relies on; a flag, when given, still wins."""
    pytest.importorskip("pydantic_settings")
    from service.serve_cli import add_arguments, settings_from

    monkeypatch.setenv("MTSERVE_BUNDLE", "/srv/models/bundle")
    monkeypatch.setenv("MTSERVE_HOST", "127.0.0.2")
    monkeypatch.setenv("MTSERVE_PORT", "8080")
    monkeypatch.setenv("MTSERVE_MAX_BATCH_SIZE", "7")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    s = settings_from(parser.parse_args([]))
    assert (str(s.bundle), s.host, s.port, s.max_batch_size) == ("/srv/models/bundle", "127.0.0.2", 8080, 7)
    s = settings_from(parser.parse_args(["/other/bundle", "--port", "9000"]))
    assert (str(s.bundle), s.port) == ("/other/bundle", 9000)


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
    # The wheel stage copies every package pyproject.toml ships, and nothing else of the code.
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*") for pattern in include["include"]}
    copied = {m.group(1) for line in stages["wheel"] if (m := re.match(r"COPY (\w+) \./\1$", line))}
    assert copied == packages, (copied, packages)
    for pkg in packages:
        assert (ROOT / pkg / "__init__.py").is_file(), pkg
    # Every dependency install is pinned by the lock.
    for target in ("serve", "serve-gpu", "train"):
        installs = [line for line in stages[target] if "pip install -r" in line]
        assert installs, target
        for line in installs:
            for cmd in line.split("&&"):
                if "pip install -r" in cmd:
                    assert re.search(r"-c /tmp/(gpu-)?constraints\.txt", cmd), (target, cmd)


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
    assert container["args"] == ["serve"], "no flags: they would override the MTSERVE_* variables"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MTSERVE_BUNDLE"] == "/models/bundle" and env["MTSERVE_PORT"] == str(port)
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
    assert "args" not in container, "the base's flag-free args apply"
    assert {"name": "MTSERVE_DEVICE", "value": "cuda"} in container["env"]


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


def test_demo_bundle_script_checks_writable_before_training(tmp_path: Path) -> None:
    """An unwritable /models is reported at once, with the fix, before any training (not at export)."""
    stub = tmp_path / "bin/mtserve"
    stub.parent.mkdir()
    log = tmp_path / "calls.log"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{stub.parent}:/usr/bin:/bin")
    script = str(DEPLOY / "docker/build-demo-bundle.sh")
    # The parent of OUT cannot be created (a file is in the way): the same refusal as a root-owned
    # bind mount, and it also holds when the tests run as root (which writes through mode 0555).
    (tmp_path / "models").write_text("not a directory")
    proc = subprocess.run(
        ["sh", script, str(tmp_path / "models/bundle")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "cannot write to" in proc.stderr and "chown" in proc.stderr, proc.stderr
    assert not log.exists(), "nothing may run before the check"
    if os.geteuid() != 0:
        models = tmp_path / "ro"
        models.mkdir(mode=0o555)
        proc = subprocess.run(["sh", script, str(models / "bundle")], env=env, capture_output=True, text=True)
        assert proc.returncode == 1 and "cannot write to" in proc.stderr
        assert not log.exists()


# ---------------------------------------------------------------------------------------------
# dependency lock
# ---------------------------------------------------------------------------------------------
LOCK = DEPLOY / "docker/constraints.txt"
LOCK_COMMAND = (
    "uv pip compile pyproject.toml --universal --python-version 3.11 --extra serve --extra gpu "
    "--extra train -o deploy/docker/constraints.txt"
)


def lock_pins() -> dict[str, list[str]]:
    """Normalized name -> the versions pinned (one per Python-version marker)."""
    pins: dict[str, list[str]] = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.match(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
            assert m, f"not an exact pin: {line!r}"
            pins.setdefault(rfp.requirement_name(m.group(1)), []).append(m.group(2))
    return pins


def test_lock_pins_every_image_dependency() -> None:
    """deploy/docker/constraints.txt pins every dependency of the images, within pyproject's ranges,
    and names the one command that regenerates it (also in docs/deploy.md)."""
    import tomllib

    from packaging.requirements import Requirement

    assert LOCK_COMMAND in LOCK.read_text().splitlines()[1]
    assert LOCK_COMMAND in (ROOT / "docs/deploy.md").read_text()
    pins = lock_pins()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for extras in (["serve"], ["gpu"], ["train", "serve"]):
        for spec in rfp.requirements(pyproject, extras):
            req = Requirement(spec)
            name = rfp.requirement_name(spec)
            assert name in pins, f"{name} ({extras}) is not in the lock: run `{LOCK_COMMAND}`"
            for version in pins[name]:
                assert req.specifier.contains(version, prereleases=True), (
                    f"the lock's {name}=={version} is outside pyproject's {req.specifier}: "
                    f"run `{LOCK_COMMAND}`"
                )


# ---------------------------------------------------------------------------------------------
# compose limits
# ---------------------------------------------------------------------------------------------
def test_compose_has_no_hard_cpu_cap() -> None:
    """`cpus: N` makes `up` fail on a host with fewer CPUs, and `config -q` cannot catch it."""
    for name in ("compose.yaml", "compose.gpu.yaml"):
        services = yaml.safe_load((DEPLOY / name).read_text())["services"]
        for svc_name, svc in services.items():
            assert "cpus" not in svc and "cpuset" not in svc, f"{name}: {svc_name}"
            limits = svc.get("deploy", {}).get("resources", {}).get("limits", {})
            assert "cpus" not in limits, f"{name}: {svc_name}"
    assert "cpu_shares" in compose()["services"]["bundle-builder"]
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["mtserve"]
    assert "command" not in gpu, "the image's flag-free CMD, with MTSERVE_DEVICE=cuda from the environment"


# ---------------------------------------------------------------------------------------------
# Prometheus rules
# ---------------------------------------------------------------------------------------------
RULES = DEPLOY / "prometheus/rules/mtserve.rules.yml"
RULE_TESTS = DEPLOY / "prometheus/rules/mtserve.rules.test.yml"


def test_prometheus_loads_the_rules() -> None:
    """prometheus.yml's rule_files (relative to it) match the rule file, compose mounts them, and the
    alerts an operator expects are there, on metrics the server exports."""
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    matched = {p for pattern in prom["rule_files"] for p in (DEPLOY / "prometheus").glob(pattern)}
    assert matched == {RULES}, matched
    assert "./prometheus/rules:/etc/prometheus/rules:ro" in compose()["services"]["prometheus"]["volumes"]
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    for name in (
        "MtserveTargetDown",
        "MtserveHighErrorRatio",
        "MtserveQueueGrowing",
        "MtserveP99OverDeadline",
    ):
        assert name in alerts, name
        assert alerts[name]["labels"]["severity"] in {"warning", "critical"}
        assert alerts[name]["annotations"]["summary"]
    records = {r["record"] for r in rules if "record" in r}
    for r in rules:
        used = set(re.findall(r"\bmtserve_\w+", re.sub(r"\w+:\w+:\w+", "", r["expr"])))
        assert used <= DESIGN_SAMPLES, (r.get("alert") or r.get("record"), used - DESIGN_SAMPLES)
        assert set(re.findall(r"\b\w+:\w+:\w+\b", r["expr"])) <= records
    # The deadline alert uses the server's default deadline, on a latency bucket boundary.
    from service.metrics import LATENCY_BUCKETS
    from service.settings import Settings

    deadline_s = Settings.model_fields["timeout_ms"].default / 1000
    assert f"> {deadline_s:g}" in alerts["MtserveP99OverDeadline"]["expr"]
    assert deadline_s in LATENCY_BUCKETS and max(LATENCY_BUCKETS) > deadline_s


def test_prometheus_rules_promql_parses() -> None:
    promql_parser = pytest.importorskip("promql_parser")
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            promql_parser.parse(rule["expr"])


@pytest.mark.skipif(not shutil.which("promtool"), reason="no promtool (apt-get install prometheus)")
def test_promtool_check_and_test_rules() -> None:
    out = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(
        ["promtool", "check", "config", "prometheus.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "1 rule files found" in out.stdout + out.stderr, out.stdout + out.stderr
    out = subprocess.run(
        ["promtool", "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    alerts = {
        r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    }
    assert alerts <= tested, f"alerts without a unit test: {alerts - tested}"
