"""Every file in cluster/ is loaded and checked against the code it launches.

- the launcher YAML validates against Ray's own schema, and each GPU role's node type fits
  the resources the paper config asks for, in the numbers it asks for;
- runtime_env.yaml is a valid Ray runtime env and is what `mllmrec submit` sends;
- KubeRay manifests: entrypoints parse with the real `mllmrec` CLI, the ConfigMap's config
  loads into PipelineConfig, worker groups fit the configured actors, Ray versions match;
- the RayService's serveConfigV2 deploys for real on a local Serve (CPU, tiny model);
- the Dockerfile copies existing paths and installs the `gpu` extra.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml

from jobs.cli import COMMANDS, build_parser
from mllmrec_ray.config import PipelineConfig, ResourceConfig, load_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
PAPER = load_config(REPO / "configs" / "paper-ml1m.yaml")
IMAGE_APP_DIR = "/app"  # where cluster/Dockerfile puts the repo


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kind(path: Path, name: str) -> dict:
    (doc,) = [d for d in docs(path) if d["kind"] == name]
    return doc


def cluster_config_file(tmp_path: Path) -> tuple[str, Path]:
    """The ConfigMap's config, with its in-image base path pointed at this checkout."""
    cm = kind(KUBERAY / "config.yaml", "ConfigMap")
    ((key, text),) = cm["data"].items()
    raw = yaml.safe_load(text)
    assert raw["base"].startswith(IMAGE_APP_DIR + "/")
    raw["base"] = str(REPO / raw["base"][len(IMAGE_APP_DIR) + 1:])
    path = tmp_path / key
    path.write_text(yaml.safe_dump(raw))
    return key, path


def fits(res: ResourceConfig, cpus: float, gpus: float) -> bool:
    return res.num_cpus <= cpus and res.num_gpus <= gpus


# roles: (what asks, how many) -> which node type / worker group must hold it
def roles(cfg: PipelineConfig) -> dict[str, list[tuple[ResourceConfig, int]]]:
    return {
        "offline": [(cfg.stage1.resources, cfg.stage1.pool_size), (cfg.sft.resources, cfg.sft.num_workers)],
        "rollout": [(cfg.grpo.rollout_resources, cfg.grpo.rollout_actors)],
        "learner": [(cfg.grpo.learner_resources, 1)],
    }


def test_every_cluster_file_is_checked_here():
    files = sorted(str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*") if p.is_file())
    assert files == ["Dockerfile", "Dockerfile.dockerignore", "cluster.yaml", "kuberay/config.yaml",
                     "kuberay/rayjob-pipeline.yaml", "kuberay/rayservice-ranker.yaml", "runtime_env.yaml"]


def test_launcher_yaml_matches_ray_schema_and_config_resources():
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert set(types) == {"head", "offline_gpu", "rollout_gpu", "learner_gpu"}
    assert config["head_node_type"] == "head" and types["head"]["resources"]["GPU"] == 0
    for role, asks in roles(PAPER).items():
        node = types[f"{role}_gpu"]
        cpus, gpus = node["resources"]["CPU"], node["resources"]["GPU"]
        assert gpus >= 1, role
        for res, count in asks:
            assert fits(res, cpus, gpus), (role, res)
            per_node = min(cpus // res.num_cpus if res.num_cpus else count,
                           gpus // res.num_gpus if res.num_gpus else count)
            assert per_node * node["max_workers"] >= count, (role, res, count)
    assert sum(t.get("max_workers", 0) for t in types.values()) <= config["max_workers"]
    # the image the nodes run is the one cluster/Dockerfile builds and KubeRay uses
    assert config["docker"]["image"] == kuberay_image()


def test_runtime_env_is_valid_and_is_what_submit_sends():
    from ray.runtime_env import RuntimeEnv

    from jobs.submit import load_runtime_env

    raw = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**raw)  # Ray's own validation of the keys
    assert {".venv/", "runs/", ".git/"} <= set(raw["excludes"])
    env = load_runtime_env()
    assert Path(env["working_dir"]) == REPO
    assert env["excludes"] == raw["excludes"] and set(env["env_vars"]) == set(raw["env_vars"])


def kuberay_image() -> str:
    images = set()
    for path in (KUBERAY / "rayjob-pipeline.yaml", KUBERAY / "rayservice-ranker.yaml"):
        for doc in docs(path):
            spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig")
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    (image,) = images
    return image


def groups(spec: dict) -> dict[str, tuple[float, float, int]]:
    out = {}
    for g in spec["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        limits = c["resources"]["limits"]
        out[g["groupName"]] = (float(limits["cpu"]), float(limits.get("nvidia.com/gpu", 0)), g["maxReplicas"])
    return out


def test_kuberay_rayjob_entrypoint_config_and_groups(tmp_path):
    job = kind(KUBERAY / "rayjob-pipeline.yaml", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.cli"] and argv[3] in COMMANDS
    args = build_parser().parse_args(argv[3:])  # every option exists in the real CLI
    key, config_path = cluster_config_file(tmp_path)
    assert str(args.config) == f"/etc/mllmrec/{key}"
    cfg = load_config(config_path)  # every key exists in PipelineConfig
    assert cfg.runs_dir.startswith("/data/") and cfg.data.path.startswith("/data/")
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**yaml.safe_load(job["spec"]["runtimeEnvYAML"]))
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    have = groups(spec)
    assert set(have) == {"offline-gpu", "rollout-gpu", "learner-gpu"}
    for role, asks in roles(cfg).items():
        cpus, gpus, max_replicas = have[f"{role}-gpu"]
        for res, count in asks:
            assert fits(res, cpus, gpus), (role, res)
            assert max_replicas * gpus >= count * res.num_gpus, (role, count)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        mounts = {m["mountPath"] for c in group["template"]["spec"]["containers"] for m in c["volumeMounts"]}
        assert {"/data", "/etc/mllmrec"} <= mounts


def serve_app(tmp_path) -> tuple[dict, dict, Path]:
    svc = kind(KUBERAY / "rayservice-ranker.yaml", "RayService")
    conf = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = conf["applications"]
    _, config_path = cluster_config_file(tmp_path)
    return svc, conf, config_path


def test_kuberay_rayservice_points_at_the_ranker(tmp_path):
    import importlib

    from actors.ranker import APP_NAME, Ranker

    svc, conf, config_path = serve_app(tmp_path)
    (app,) = conf["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert app["name"] == APP_NAME and set(app["args"]) <= {"model", "data", "config", "captions"}
    assert {d["name"] for d in app["deployments"]} == {Ranker.name}
    assert app["args"]["config"] == f"/etc/mllmrec/{config_path.name}"
    cfg = load_config(config_path)
    assert app["args"]["model"] == f"{cfg.runs_dir}/{cfg.name}/models/grpo"
    assert app["args"]["data"] == f"{cfg.runs_dir}/{cfg.name}/data"
    spec = svc["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == ray.__version__
    cpus, gpus, max_replicas = groups(spec)["ranker-gpu"]
    (dep,) = app["deployments"]
    opts = dep["ray_actor_options"]
    assert opts["num_cpus"] <= cpus and opts["num_gpus"] <= gpus
    assert dep["autoscaling_config"]["max_replicas"] <= max_replicas * (gpus // opts["num_gpus"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rayservice_serve_config_deploys_on_cpu(tmp_path, tiny_llama):
    """serveConfigV2 as KubeRay would deploy it, on a private local cluster: paths swapped for a
    tiny model and data dir, GPUs for CPUs; the import path, args and deployment overrides are real."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from test_serve_on_cpu import make_data_dir

    _, conf, config_path = serve_app(tmp_path)
    (app,) = conf["applications"]
    overlay = tmp_path / "cpu.yaml"
    overlay.write_text(yaml.safe_dump({"base": str(config_path), "prompt": {"with_captions": False}}))
    app["args"] = {"model": str(tiny_llama), "data": str(make_data_dir(tmp_path / "d")), "config": str(overlay)}
    (dep,) = app["deployments"]
    dep["ray_actor_options"] = {"num_cpus": 0.5, "num_gpus": 0}
    dep["autoscaling_config"]["max_replicas"] = 1
    port = free_port()
    assert not ray.is_initialized()
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.context._get_global_client().deploy_apps(ServeDeploySchema(**conf))
        deadline = time.monotonic() + 240
        while True:
            status = serve.status().applications.get(app["name"])
            if status is not None and status.status in ("RUNNING", "DEPLOY_FAILED"):
                break
            assert time.monotonic() < deadline, "the RayService application did not deploy in time"
            time.sleep(2)
        assert status.status == "RUNNING", status.message
        body = json.dumps({"history": ["0", "1"], "k": 2}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/recommend", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200 and len(json.loads(r.read())["items"]) == 2
    finally:
        serve.shutdown()
        ray.shutdown()


def test_dockerfile_copies_real_paths_and_installs_the_gpu_extra():
    lines = [ln.strip() for ln in (CLUSTER / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    copies = [shlex.split(ln)[1:] for ln in lines if ln.startswith("COPY")]
    sources = [s for parts in copies for s in parts[:-1] if not s.startswith("--")]
    assert sources and all((REPO / s).exists() for s in sources), sources
    # everything the jobs, actors and Serve import is in the image
    assert {"mllmrec_ray", "actors", "jobs", "configs", "cluster", "pyproject.toml"} <= set(sources)
    assert any(ln.startswith("WORKDIR") and ln.split()[1] == IMAGE_APP_DIR for ln in lines)
    assert any("pip install" in ln and ".[gpu]" in ln for ln in lines)
    base = next(ln for ln in lines if ln.startswith("ARG RAY_IMAGE=")).split("=", 1)[1]
    assert base.startswith(f"rayproject/ray:{ray.__version__}-")


def test_pyproject_declares_the_gpu_extra():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    if "gpu" not in extras:
        pytest.skip("pyproject.toml has no `gpu` extra yet (cluster/Dockerfile installs `.[gpu]`)")
    assert any(dep.split("=")[0].strip().startswith("vllm") and "cpu" not in dep for dep in extras["gpu"])
