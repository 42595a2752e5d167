"""cluster/ manifests agree with the code: Ray version, image, GPU requests, the relabel entrypoint."""
from __future__ import annotations

import re
import shlex
import tomllib

import pytest
import yaml

from cluster_util import REPO, load_relabel
from grm_ray.config import load_config

pytestmark = pytest.mark.timeout(60)
CLUSTER = REPO / "cluster"
APP_DIR = "/home/ray/grm-ray"  # where cluster/Dockerfile puts the repository in the image
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY = next(re.search(r"==([\d.]+)", d).group(1) for d in PYPROJECT["project"]["dependencies"]
           if d.startswith("ray["))
PY = "py" + re.search(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"]).expand(r"\1\2")
SCHEDULING_CONFIG = REPO / "jobs" / "configs" / "deepseek-grm-27b.yaml"
TRAIN_RECIPES = ("rft", "grpo", "meta-rm")


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def kind(name: str, k: str) -> dict:
    return next(d for d in docs(name) if d["kind"] == k)


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def check_relabel_command(argv: list[str]) -> None:
    """`python /home/ray/grm-ray/jobs/relabel.py ARGS`: the script exists here and its parser takes ARGS."""
    assert argv[0] == "python", argv
    script = argv[1]
    assert script.startswith(APP_DIR + "/"), script
    assert (REPO / script[len(APP_DIR) + 1:]).is_file(), f"{script} is not in the repository"
    args = load_relabel().parser().parse_args(argv[2:])  # argparse exits (SystemExit) on a bad option
    assert "{date}" in args.input and "{date}" in args.output
    assert args.config.startswith(APP_DIR + "/")
    load_config(REPO / args.config[len(APP_DIR) + 1:])
    load_relabel().resolve_date(args.date)


def test_pins():
    assert RAY == "2.60.0" and PY == "py311"


def test_dockerfile_base_image_and_layout():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY)}-{PY}-gpu$", text, re.M), "base image != pinned Ray"
    assert f"WORKDIR {APP_DIR}" in text
    assert "COPY --chown=ray:users jobs ./jobs" in text and "COPY --chown=ray:users grm_ray ./grm_ray" in text
    assert f"ray.__version__ == '{RAY}'" in text


def test_every_kubernetes_image_is_this_version():
    for name in ("raycluster.yaml", "rayjob-relabel.yaml", "raycronjob-relabel.yaml", "cronjob-relabel.yaml",
                 *(f"rayjob-train-{r}.yaml" for r in TRAIN_RECIPES)):
        images = re.findall(r"image:\s*(\S+)", (CLUSTER / name).read_text())
        for image in images:
            assert image.endswith(f":{VERSION}-ray{RAY}-gpu"), f"{name}: {image} is not grm-ray {VERSION} on Ray {RAY}"


def test_raycluster_cpu_head_and_autoscaling_gpu_workers():
    rc = kind("raycluster.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"] == RAY and spec["enableInTreeAutoscaling"] is True
    head = containers(spec["headGroupSpec"]["template"])[0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(containers(g["template"])[0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    group = gpu_groups[0]
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    gpus = int(containers(group["template"])[0]["resources"]["limits"]["nvidia.com/gpu"])
    assert containers(group["template"])[0]["resources"]["requests"]["nvidia.com/gpu"] == gpus
    cfg = load_config(SCHEDULING_CONFIG)  # the GPU pool can hold both engine pools at their maximum
    assert group["maxReplicas"] * gpus >= (cfg.grm_actors[1] + cfg.meta_actors[1]) * cfg.gpus_per_actor


def test_rayjob_runs_the_nightly_relabel():
    job = kind("rayjob-relabel.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    cluster = kind("raycluster.yaml", "RayCluster")["metadata"]["name"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster
    check_relabel_command(shlex.split(job["spec"]["entrypoint"]))


def test_raycronjob_schedules_the_same_job():
    cron = kind("raycronjob-relabel.yaml", "RayCronJob")
    assert cron["apiVersion"] == "ray.io/v1"
    assert len(cron["spec"]["schedule"].split()) == 5
    template = cron["spec"]["jobTemplate"]
    assert template["clusterSelector"]["ray.io/cluster"] == kind("raycluster.yaml", "RayCluster")["metadata"]["name"]
    assert template["entrypoint"] == kind("rayjob-relabel.yaml", "RayJob")["spec"]["entrypoint"]
    check_relabel_command(shlex.split(template["entrypoint"]))


def test_kubernetes_cronjob_submits_the_relabel():
    cron = kind("cronjob-relabel.yaml", "CronJob")
    cluster = kind("raycluster.yaml", "RayCluster")["metadata"]["name"]
    command = containers(cron["spec"]["jobTemplate"]["spec"]["template"])[0]["command"]
    assert command[:3] == ["ray", "job", "submit"]
    assert f"--address=http://{cluster}-head-svc:8265" in command
    check_relabel_command(command[command.index("--") + 1:])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_aws_cluster_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(raw))  # Ray's own schema and checks (no cloud calls)
    assert raw["provider"]["type"] == "aws"
    assert raw["docker"]["image"] == f"rayproject/ray:{RAY}-{PY}-gpu"
    setup = " ".join(raw["setup_commands"])
    assert re.search(rf"ray\[[\w,]+\]=={re.escape(RAY)}", setup) and "/home/ray/grm-ray[gpu]" in setup
    assert raw["file_mounts"][APP_DIR] == "."
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = [t for n, t in raw["available_node_types"].items() if n != raw["head_node_type"]]
    gpu_workers = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers and all(t["min_workers"] == 0 < t["max_workers"] for t in gpu_workers)
    cfg = load_config(SCHEDULING_CONFIG)
    assert sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_workers) >= \
        (cfg.grm_actors[1] + cfg.meta_actors[1]) * cfg.gpus_per_actor


@pytest.mark.parametrize("recipe", TRAIN_RECIPES)
def test_rayjob_trains_each_spct_recipe_on_ray_train(recipe):
    """`python -m grm_ray.cli train RECIPE DATA OUT --config C`: the CLI parses it, the config validates for the
    recipe, it runs on Ray Train with S3 checkpoints, and the GPU pool can hold its workers."""
    from grm_ray.cli import app
    from grm_ray.train import load_train_config
    from typer.main import get_command

    job = kind(f"rayjob-train-{recipe}.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == kind("raycluster.yaml", "RayCluster")["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:5] == ["python", "-m", "grm_ray.cli", "train", recipe]
    command = get_command(app).commands["train"].commands[recipe]
    params = command.make_context(recipe, argv[5:]).params  # click raises on an unknown option
    config = params["config"]
    assert str(config).startswith(APP_DIR + "/")
    cfg = load_train_config(REPO / str(config)[len(APP_DIR) + 1:], recipe=recipe, data=params["data"],
                            output=params["output"])
    assert cfg.data.startswith("s3://") and cfg.output.startswith("s3://") and cfg.checkpoints.startswith("s3://")
    assert cfg.workers >= 1 and cfg.gpus_per_worker >= 1 and cfg.max_failures >= 1
    group = next(g for g in kind("raycluster.yaml", "RayCluster")["spec"]["workerGroupSpecs"]
                 if int(containers(g["template"])[0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1)
    gpus = int(containers(group["template"])[0]["resources"]["limits"]["nvidia.com/gpu"])
    assert group["maxReplicas"] * gpus >= cfg.workers * cfg.gpus_per_worker
    assert ".[gpu,train]" in (CLUSTER / "Dockerfile").read_text()  # the image has TRL and PEFT
