"""The cluster files are checked, not just shipped: ray_cluster.yaml against the schema inside the installed Ray, its
node types against what the example spec asks for, k8s/rayjob.yaml against the CLI and the spec, and the per-task
custom resources (resources.custom) from the spec to the driver's local check."""

import copy
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys

import jsonschema
import pytest
import yaml

from batch_testkit import spec_dict
from flashu_batch.app.cli import build_parser
from flashu_batch.jobs.spec import SpecError, load_spec, parse_spec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_yaml(*path):
    with open(os.path.join(REPO, *path)) as f:
        return yaml.safe_load(f)


def ray_schema() -> dict:
    """Ray's own launcher schema, from the installed package (found without importing ray)."""
    import importlib.util

    [root] = importlib.util.find_spec("ray").submodule_search_locations
    with open(os.path.join(root, "autoscaler", "ray-schema.json")) as f:
        return json.load(f)


def test_cluster_config_validates_against_the_schema_bundled_with_ray():
    config, schema = read_yaml("ray_cluster.yaml"), ray_schema()
    jsonschema.validate(config, schema)
    broken = copy.deepcopy(config)  # the validator is strict where it matters: a misspelt key is an error
    broken["available_node_types"]["t2i_gpu"]["resource"] = broken["available_node_types"]["t2i_gpu"].pop("resources")
    with pytest.raises(jsonschema.ValidationError, match="resource"):
        jsonschema.validate(broken, schema)
    assert config["idle_timeout_minutes"] > 0 and config["head_node_type"] in config["available_node_types"]


def pool_needs(task) -> dict:
    res = task.resources
    return {"GPU": res.workers * res.gpus_per_worker, "CPU": res.workers * res.cpus_per_worker,
            **{name: res.workers * amount for name, amount in res.custom.items()}}


def test_each_task_of_the_example_spec_fits_only_its_own_gpu_node_type():
    config, spec = read_yaml("ray_cluster.yaml"), load_spec(os.path.join(REPO, "examples", "cluster_s3.yaml"))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["resources"]
    assert head.get("CPU") == 0 and not set(head) - {"CPU"}  # the head runs no tasks and no actors
    kinds = {t.kind for t in spec.tasks}
    for task in spec.tasks:
        assert set(task.resources.custom) == {task.kind}, task.task_name
        # the node types that can hold this pool's actors: those advertising its custom resource
        mine = {name: t for name, t in types.items() if task.kind in t["resources"]}
        assert len(mine) == 1 and not any(set(t["resources"]) & (kinds - {task.kind}) for t in mine.values())
        [node] = mine.values()
        for resource, need in pool_needs(task).items():
            have = node["max_workers"] * node["resources"].get(resource, 0)
            assert need <= have, f"{task.task_name}: {need} {resource} needed, {have} at most"
        nodes = task.resources.workers / min(node["resources"][task.kind] / task.resources.custom[task.kind],
                                             node["resources"]["GPU"] / task.resources.gpus_per_worker)
        assert nodes <= min(node["max_workers"], config["max_workers"])
        # per node, the actors leave CPUs for the read/validate/write tasks
        per_node = node["resources"]["GPU"] / task.resources.gpus_per_worker
        assert per_node * task.resources.cpus_per_worker < node["resources"]["CPU"]


def pins(command: str) -> dict:
    return dict(re.findall(r'"?([a-z]+)(?:\[[a-z,]+\])?==([0-9.]+)"?', command))


def test_nodes_and_the_image_install_what_ci_tests():
    config = read_yaml("ray_cluster.yaml")
    [setup] = config["setup_commands"]
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = pins(f.read())
    with open(os.path.join(REPO, "k8s", "Dockerfile")) as f:
        dockerfile = f.read()
    installed_ray = importlib.metadata.version("ray")
    assert pins(setup) == {"torch": ci["torch"], "ray": installed_ray}
    assert setup.split()[-1] == "/home/ray/flashu-batch" == next(k for k, v in config["file_mounts"].items()
                                                                 if v == ".")
    assert config["docker"]["image"].startswith(f"rayproject/ray:{installed_ray}-")
    [run] = [line for line in dockerfile.splitlines() if line.startswith("RUN pip install")]
    assert pins(run) == pins(setup) and f"FROM {config['docker']['image']}" in dockerfile
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray start" not in command or "RAY_AUTH_MODE=token ray start" in command
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def test_the_kuberay_example_runs_our_cli_on_a_valid_spec_with_matching_worker_groups():
    with open(os.path.join(REPO, "k8s", "rayjob.yaml")) as f:
        config_map, job = yaml.safe_load_all(f)
    assert (config_map["kind"], job["kind"], job["apiVersion"]) == ("ConfigMap", "RayJob", "ray.io/v1")
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "flashu-batch"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.address == "auto"

    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    [mount] = [m for m in head["containers"][0]["volumeMounts"] if args.spec.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    spec = parse_spec(yaml.safe_load(config_map["data"][os.path.basename(args.spec)]))
    assert cluster["authOptions"] == {"mode": "token"} and cluster["rayVersion"] == importlib.metadata.version("ray")
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    groups = {}
    for group in cluster["workerGroupSpecs"]:
        custom = json.loads(json.loads(group["rayStartParams"]["resources"]))  # a quoted JSON object, as ray start takes it
        groups[group["groupName"]] = dict(custom, GPU=float(group["rayStartParams"]["num-gpus"]),
                                          replicas=group["maxReplicas"])
        [container] = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == group["rayStartParams"]["num-gpus"]
    for task in spec.tasks:
        [group] = [g for g in groups.values() if task.kind in g]
        assert task.resources.workers * task.resources.custom[task.kind] <= group["replicas"] * group[task.kind]
        assert task.resources.workers * task.resources.gpus_per_worker <= group["replicas"] * group["GPU"]

    # credentials only by reference to a Secret, in every container that touches S3
    containers = [head["containers"][0]] + [g["template"]["spec"]["containers"][0]
                                            for g in cluster["workerGroupSpecs"]]
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["key"] == name


def custom_spec(tmp_path, custom) -> dict:
    return spec_dict("custom", str(tmp_path), [dict(kind="t2i", input=dict(uris=str(tmp_path / "p.jsonl"),
                                                                           format="jsonl"),
                                                    output=str(tmp_path / "out"),
                                                    resources=dict(workers=2, gpus_per_worker=0, cpus_per_worker=0.5,
                                                                   custom=custom))])


@pytest.mark.parametrize("custom, message", [
    ({"GPU": 1}, "got resource name 'GPU'; expected a custom resource name"),
    ({"t2i gpu": 1}, "got resource name 't2i gpu'"),
    ({"t2i": 1.5}, "t2i: got 1.5; expected a fraction in (0, 1] or a whole number"),
    ({"t2i": 0}, "t2i: got 0; expected a fraction"),
])
def test_custom_resources_are_checked_in_the_spec(tmp_path, custom, message):
    with pytest.raises(SpecError, match=re.escape(f"tasks[0].resources.custom: {message}")):
        parse_spec(custom_spec(tmp_path, custom))
    assert parse_spec(custom_spec(tmp_path, {"t2i": 0.5, "big-gpu": 2})).tasks[0].resources.custom == {
        "t2i": 0.5, "big-gpu": 2}
    assert parse_spec(spec_dict("d", "m", [dict(kind="t2i", input=dict(uris="p", format="jsonl"),
                                                output="o")])).tasks[0].resources.custom == {}


def test_a_local_run_refuses_custom_resources_before_starting_ray(tmp_path):
    """A local Ray has no custom resources: a pool that asks for them would wait forever, so the run refuses, before
    it starts a Ray at all."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle"}\n')
    (tmp_path / "job.json").write_text(json.dumps(custom_spec(tmp_path, {"t2i": 1})))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    code = ("import sys; from app.cli import main; rc = main(sys.argv[1:]); import ray; "
            "print('ray started' if ray.is_initialized() else 'ray not started'); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, "run", str(tmp_path / "job.json"), "--quiet"],
                            env=dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("resources.custom asks for ['t2i'], which only a cluster's node types provide (see ray_cluster.yaml); "
            "a local Ray has none.") in result.stderr
    assert "ray not started" in result.stdout and not (tmp_path / "out").exists()
