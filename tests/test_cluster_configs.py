"""The files in cluster/: the launcher YAMLs against Ray's own autoscaler schema, the KubeRay
manifests against the fields KubeRay's CRDs require, the security and scale-to-zero settings
they promise, and the rayft configs they run. Fast: no cluster, no cloud, no Kubernetes."""

from __future__ import annotations

import copy
import ipaddress
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.providers import _get_default_config
from ray.autoscaler._private.util import prepare_config, validate_config

from rayft.config import load_config, resolve_paths
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
LAUNCHER_FILES = sorted(CLUSTER.glob("*.yaml"))
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
# The cluster runs the Ray this project is tested with (and that validated these files).
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311"
TORCH = "torch==2.13.0"
DEEPSPEED = "deepspeed==0.19.8"
SHARED = "/mnt/shared"  # the shared filesystem every setup mounts; README, "Shared storage"

# The `required` lists of the openAPIV3Schema (ray.io/v1) in KubeRay's CRDs,
# ray-project/kuberay ray-operator/config/crd/bases/ray.io_rayclusters.yaml and
# ray.io_rayjobs.yaml at commit 1184bc8 (the KubeRay v1.0 API; the container, port, env
# and volume-mount entries are Kubernetes' core/v1 ones embedded in those CRDs). Later
# releases add optional fields (authOptions in 1.5.1) and relax some of these (entrypoint,
# rayStartParams); the manifests set every field listed here, so they fit either way.
CRD_REQUIRED = {
    "RayCluster.spec": ["headGroupSpec"],
    "headGroupSpec": ["rayStartParams", "template"],
    "workerGroupSpecs[]": ["groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"],
    "template.spec": ["containers"],
    "containers[]": ["name"],
    "ports[]": ["containerPort"],
    "env[]": ["name"],
    "volumeMounts[]": ["mountPath", "name"],
    "RayJob.spec": ["entrypoint"],
}


def load_yaml(path: Path) -> Any:
    with open(path) as handle:
        return yaml.safe_load(handle)


# --------------------------------------------------------- Ray cluster launcher (aws, gcp)


def start_commands(cfg: dict, key: str) -> list[str]:
    return [c for c in cfg[key] if "ray start" in c]


def is_private_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (address.is_loopback or address.is_private) and not address.is_unspecified


def pip_installs(commands: list[str]) -> list[str]:
    return [c for c in commands if c.lstrip().startswith("pip install")]


def install_problems(commands: list[str], where: str, *, cuda: bool) -> list[str]:
    """torch pinned and installed first (from the CUDA index on GPU nodes), then DeepSpeed
    pinned and built without isolation against that torch."""
    installs = pip_installs(commands)
    torch = [i for i, c in enumerate(installs) if TORCH in c.split()]
    speed = [i for i, c in enumerate(installs) if DEEPSPEED in c.split()]
    if not torch or not speed:
        return [f"{where}: needs `pip install {TORCH}` and `pip install {DEEPSPEED}`"]
    problems = []
    if torch[0] > speed[0]:
        problems.append(f"{where}: {DEEPSPEED} is installed before {TORCH}")
    if "--no-build-isolation" not in installs[speed[0]].split():
        problems.append(f"{where}: {DEEPSPEED} must be installed with --no-build-isolation")
    index = re.search(r"--index-url\s+(\S+)", installs[torch[0]])
    if cuda and not (index and re.search(r"download\.pytorch\.org/whl/cu\d+$", index[1])):
        problems.append(f"{where}: GPU nodes need torch from a CUDA index, got {index}")
    return problems


def launcher_problems(cfg: dict) -> list[str]:
    """What cluster/README.md promises of every launcher config, each problem named."""
    problems = []
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    gpu_types = {n: t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    if head.get("resources", {}).get("GPU", 0):
        problems.append("the head node type must be CPU-only")
    if not gpu_types:
        problems.append("no node type with resources.GPU >= 1")
    for name, node_type in gpu_types.items():
        if node_type.get("min_workers", 0) != 0:
            problems.append(f"{name}: min_workers must be 0, got {node_type['min_workers']}")
        if node_type.get("max_workers", cfg["max_workers"]) < 1 or cfg["max_workers"] < 1:
            problems.append(f"{name}: max_workers must be at least 1")
    if not cfg.get("idle_timeout_minutes", 0) > 0:
        problems.append("idle_timeout_minutes must be set (> 0) for scale to zero")

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        if not start_commands(cfg, key):
            problems.append(f"{key}: no `ray start`")
        for command in start_commands(cfg, key):
            if not re.search(r"(^|[\s;])RAY_AUTH_MODE=token\s+ray start", command):
                problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token: {command!r}")
        if any("0.0.0.0" in c for c in cfg[key]):
            problems.append(f"{key}: listens on 0.0.0.0")
    for command in start_commands(cfg, "head_start_ray_commands"):
        host = re.search(r"--dashboard-host[= ](\S+)", command)
        if not host or not is_private_host(host[1]):
            problems.append(f"head `ray start` needs --dashboard-host=127.0.0.1, got {host}")

    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        if public and rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", 65535):
            problems.append(f"security group opens 8265 to the internet: {rule}")
    mounts = cfg.get("file_mounts", {})
    if "~/.ray/auth_token" not in mounts and not any(
        "RAY_AUTH_TOKEN" in c for c in cfg["worker_start_ray_commands"]
    ):
        problems.append("no token shared with the nodes (~/.ray/auth_token or RAY_AUTH_TOKEN)")
    if "configs" not in mounts.values():
        problems.append("file_mounts must carry configs/")
    if f"-v {SHARED}:{SHARED}" not in cfg.get("docker", {}).get("run_options", []):
        problems.append(f"the containers must see the shared filesystem at {SHARED}")

    problems += install_problems(
        cfg["setup_commands"] + cfg["head_setup_commands"], "head", cuda=False
    )
    problems += install_problems(
        cfg["setup_commands"] + cfg["worker_setup_commands"], "GPU workers", cuda=True
    )
    return problems


@pytest.fixture(params=LAUNCHER_FILES, ids=lambda p: p.name)
def launcher(request) -> dict:
    return load_yaml(request.param)


def test_both_clouds_have_a_launcher_config():
    assert [p.name for p in LAUNCHER_FILES] == ["aws.yaml", "gcp.yaml"]


def test_launcher_config_passes_rays_own_validator_as_written_and_as_ray_up_prepares_it(
    launcher,
):
    validate_config(copy.deepcopy(launcher))  # ray-schema.json plus Ray's own checks
    # What `ray up` does before it talks to the cloud: merge the provider's defaults, fill
    # per-type worker limits, check Docker, then validate again.
    prepared = prepare_config(copy.deepcopy(launcher))
    validate_config(prepared)
    # Every key Ray's defaults would fill is ours, so nothing of Ray's example config (a
    # nightly wheel, a dashboard on 0.0.0.0) leaks into the cluster.
    assert set(_get_default_config(launcher["provider"])) <= set(launcher)
    assert prepared["head_setup_commands"] == (
        launcher["setup_commands"] + launcher["head_setup_commands"]
    )
    assert prepared["worker_setup_commands"] == (
        launcher["setup_commands"] + launcher["worker_setup_commands"]
    )
    assert prepared["available_node_types"][launcher["head_node_type"]]["max_workers"] == 0
    assert launcher_problems(prepared) == []


def test_rays_validator_rejects_what_its_schema_forbids(launcher):
    """The validator is live: a misspelled node-type key and a non-integer resource fail."""
    misspelled = copy.deepcopy(launcher)
    misspelled["available_node_types"]["gpu_worker"]["min_wokers"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        validate_config(misspelled)
    fractional = copy.deepcopy(launcher)
    fractional["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="integer"):
        validate_config(fractional)


def test_launcher_config_keeps_its_promises(launcher):
    assert launcher_problems(launcher) == []
    gpu = launcher["available_node_types"]["gpu_worker"]
    assert (gpu["min_workers"], gpu["resources"]["GPU"]) == (0, 1)
    assert 1 <= gpu["max_workers"] <= launcher["max_workers"]
    assert launcher["docker"]["image"] == f"{RAY_IMAGE}-gpu"
    assert launcher["docker"]["head_image"] == f"{RAY_IMAGE}-cpu"


def test_launcher_problems_are_named(launcher):
    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = 2
    del broken["idle_timeout_minutes"]
    broken["head_start_ray_commands"][-1] = broken["head_start_ray_commands"][-1].replace(
        "RAY_AUTH_MODE=token ", ""
    )
    broken["head_start_ray_commands"][-1] = broken["head_start_ray_commands"][-1].replace(
        "127.0.0.1", "0.0.0.0"
    )
    broken["worker_setup_commands"] = [
        c.replace(" --no-build-isolation", "") for c in broken["worker_setup_commands"]
    ]
    broken["docker"]["run_options"] = ["--ulimit nofile=65536:65536"]
    problems = "\n".join(launcher_problems(broken))
    assert "gpu_worker: min_workers must be 0, got 2" in problems
    assert "idle_timeout_minutes must be set" in problems
    assert "head_start_ray_commands: `ray start` without RAY_AUTH_MODE=token" in problems
    assert "head_start_ray_commands: listens on 0.0.0.0" in problems
    assert "head `ray start` needs --dashboard-host=127.0.0.1" in problems
    assert "GPU workers: deepspeed==0.19.8 must be installed with --no-build-isolation" in problems
    assert "the containers must see the shared filesystem at /mnt/shared" in problems


# ------------------------------------------------------------------------------ KubeRay


def missing_required(section: str, obj: dict, path: str) -> list[str]:
    return [f"{path}.{key}" for key in CRD_REQUIRED[section] if key not in obj]


def cluster_spec_problems(spec: dict, path: str) -> list[str]:
    """Every field KubeRay's CRD requires, down to containers, ports, env and mounts."""
    problems = missing_required("RayCluster.spec", spec, path)
    groups = [("headGroupSpec", f"{path}.headGroupSpec", spec.get("headGroupSpec", {}))]
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        groups.append(("workerGroupSpecs[]", f"{path}.workerGroupSpecs[{i}]", group))
    for section, where, group in groups:
        problems += missing_required(section, group, where)
        problems += [
            f"{where}.rayStartParams.{k}: the CRD wants a string, got {v!r}"
            for k, v in group.get("rayStartParams", {}).items()
            if not isinstance(v, str)
        ]
        pod = group.get("template", {}).get("spec", {})
        problems += missing_required("template.spec", pod, f"{where}.template.spec")
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for j, container in enumerate(pod.get("containers", [])):
            at = f"{where}.template.spec.containers[{j}]"
            problems += missing_required("containers[]", container, at)
            for field in ("ports", "env", "volumeMounts"):
                for k, item in enumerate(container.get(field, [])):
                    problems += missing_required(f"{field}[]", item, f"{at}.{field}[{k}]")
            problems += [
                f"{at}.volumeMounts: no volume named {m['name']!r}"
                for m in container.get("volumeMounts", [])
                if m.get("name") not in volumes
            ]
    return problems


def gpu_groups(spec: dict) -> list[dict]:
    return [
        g
        for g in spec["workerGroupSpecs"]
        if any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            for c in g["template"]["spec"]["containers"]
        )
    ]


def ray_containers(spec: dict) -> list[tuple[dict, dict, bool]]:
    """(pod template, Ray container, is a GPU group) for the head and every worker group."""
    groups = [(spec["headGroupSpec"], False)] + [
        (g, g in gpu_groups(spec)) for g in spec["workerGroupSpecs"]
    ]
    return [(g["template"], g["template"]["spec"]["containers"][0], gpu) for g, gpu in groups]


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3])


def kuberay_problems(spec: dict) -> list[str]:
    """What cluster/README.md promises of the KubeRay cluster spec, each problem named."""
    problems = []
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    if not spec.get("autoscalerOptions", {}).get("idleTimeoutSeconds", 0) > 0:
        problems.append("autoscalerOptions.idleTimeoutSeconds must be set (> 0)")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("authOptions.mode must be token")
    if version(str(spec.get("rayVersion", "0"))) < (2, 52):
        problems.append(f"rayVersion must be >= 2.52 for token auth, got {spec.get('rayVersion')}")
    elif spec["rayVersion"] != ray.__version__:
        problems.append(f"rayVersion {spec['rayVersion']} is not the tested {ray.__version__}")
    head = spec["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"headGroupSpec.serviceType must be ClusterIP, got {head['serviceType']}")
    if head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
        problems.append("headGroupSpec.headService must be ClusterIP")
    if head.get("enableIngress"):
        problems.append("headGroupSpec.enableIngress exposes the dashboard")
    if not gpu_groups(spec):
        problems.append("no worker group with nvidia.com/gpu limits")
    for group in gpu_groups(spec):
        name = group["groupName"]
        if group["minReplicas"] != 0:
            problems.append(f"{name}: minReplicas must be 0, got {group['minReplicas']}")
        if group["maxReplicas"] < 1:
            problems.append(f"{name}: maxReplicas must be at least 1")
    for template, container, gpu in ray_containers(spec):
        where = container["name"]
        if container["image"] != f"{RAY_IMAGE}-{'gpu' if gpu else 'cpu'}":
            problems.append(f"{where}: image {container['image']}, not {RAY_IMAGE}-*")
        script = " ".join(container.get("args", []))
        commands = [c.strip() for c in re.split(r"&&|;", script)]
        problems += install_problems(commands, where, cuda=gpu)
        claims = {v["name"] for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v}
        mounts = container.get("volumeMounts", [])
        if not any(m["mountPath"] == SHARED and m["name"] in claims for m in mounts):
            problems.append(f"{where}: needs the shared claim mounted at {SHARED}")
        # With this annotation KubeRay runs the command as given: it must start Ray itself.
        annotations = template.get("metadata", {}).get("annotations", {})
        overwrites = annotations.get("ray.io/overwrite-container-cmd") == "true"
        if overwrites and "$KUBERAY_GEN_RAY_START_CMD" not in script:
            problems.append(f"{where}: overwrites the command but never starts Ray")
    return problems


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = {}
    for path in (RAYCLUSTER, RAYJOB):
        with open(path) as handle:
            loaded = [d for d in yaml.safe_load_all(handle) if d is not None]
        assert len(loaded) == 1, f"{path.name}: one object per file"
        docs[loaded[0]["kind"]] = loaded[0]
    return docs


def test_kuberay_manifests_have_every_field_the_crds_require(manifests):
    cluster, job = manifests["RayCluster"], manifests["RayJob"]
    assert (cluster["apiVersion"], job["apiVersion"]) == ("ray.io/v1", "ray.io/v1")
    assert cluster["metadata"]["name"] and job["metadata"]["name"]
    assert cluster_spec_problems(cluster["spec"], "RayCluster.spec") == []
    assert missing_required("RayJob.spec", job["spec"], "RayJob.spec") == []
    assert cluster_spec_problems(job["spec"]["rayClusterSpec"], "RayJob.spec.rayClusterSpec") == []


def test_crd_check_names_what_is_missing(manifests):
    spec = copy.deepcopy(manifests["RayCluster"]["spec"])
    del spec["workerGroupSpecs"][0]["groupName"]
    del spec["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    spec["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1
    assert cluster_spec_problems(spec, "spec") == [
        "spec.headGroupSpec.template.spec.containers[0].name",
        "spec.workerGroupSpecs[0].groupName",
        "spec.workerGroupSpecs[0].rayStartParams.num-gpus: the CRD wants a string, got 1",
    ]


def test_kuberay_cluster_keeps_its_promises(manifests):
    spec = manifests["RayCluster"]["spec"]
    assert kuberay_problems(spec) == []
    (gpu,) = gpu_groups(spec)
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 8)
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"


def test_rayjob_runs_on_the_same_cluster_and_cleans_up(manifests):
    job = manifests["RayJob"]["spec"]
    assert job["rayClusterSpec"] == manifests["RayCluster"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] >= 0
    assert kuberay_problems(job["rayClusterSpec"]) == []


def test_kuberay_problems_are_named(manifests):
    spec = copy.deepcopy(manifests["RayCluster"]["spec"])
    spec["headGroupSpec"]["serviceType"] = "LoadBalancer"
    spec["authOptions"] = {"mode": "disabled"}
    spec["enableInTreeAutoscaling"] = False
    spec["workerGroupSpecs"][0]["minReplicas"] = 1
    args = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["args"]
    args[0] = args[0].replace("$KUBERAY_GEN_RAY_START_CMD", "true")
    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"].pop()
    problems = "\n".join(kuberay_problems(spec))
    assert "headGroupSpec.serviceType must be ClusterIP, got LoadBalancer" in problems
    assert "authOptions.mode must be token" in problems
    assert "enableInTreeAutoscaling must be true" in problems
    assert "gpu: minReplicas must be 0, got 1" in problems
    assert "ray-worker: overwrites the command but never starts Ray" in problems
    assert "ray-head: needs the shared claim mounted at /mnt/shared" in problems


# ------------------------------------------------------- the rayft configs they name


def config_mounts() -> dict[str, Path]:
    """Where each setup puts the repo's configs/: the launchers' file_mounts and the
    KubeRay volume of the ConfigMap the README creates from configs/."""
    mounts = {}
    for path in LAUNCHER_FILES:
        for remote, local in load_yaml(path)["file_mounts"].items():
            if local == "configs":
                mounts[remote.rstrip("/")] = REPO / "configs"
    readme = (CLUSTER / "README.md").read_text()
    assert "kubectl create configmap rayft-configs --from-file=configs/" in readme
    spec = load_yaml(RAYCLUSTER)["spec"]
    pod = spec["headGroupSpec"]["template"]["spec"]
    names = {
        v["name"] for v in pod["volumes"] if v.get("configMap", {}).get("name") == "rayft-configs"
    }
    for mount in pod["containers"][0]["volumeMounts"]:
        if mount["name"] in names:
            mounts[mount["mountPath"].rstrip("/")] = REPO / "configs"
    return mounts


COMMAND = re.compile(
    r"rayft\.(?P<verb>tune|train)\s+--config\s+(?P<config>\S+)(?P<overrides>(?:\s+[a-z_][\w.]*=\S+)*)"
)


def referenced_runs() -> list[tuple[str, str, str, list[str]]]:
    """(file, verb, config path, overrides) of every `rayft.tune|train --config` in cluster/:
    the RayJob's entrypoint, the YAMLs' comments and the README's commands."""
    runs = []
    for path in sorted(CLUSTER.rglob("*")):
        if path.suffix not in (".yaml", ".md"):
            continue
        text = re.sub(r"(?m)^\s*#", "", path.read_text())  # comments hold commands too
        text = text.replace("\\\n", " ")
        for match in COMMAND.finditer(text):
            if "<" in match["config"]:  # a template (`--config .../<name>.yaml`), not a run
                continue
            overrides = match["overrides"].split()
            runs.append((path.name, match["verb"], match["config"], overrides))
    entrypoint = shlex.split(load_yaml(RAYJOB)["spec"]["entrypoint"])
    assert entrypoint[:4] == ["python", "-m", "rayft.tune", "--config"]
    runs.append(("rayjob.yaml: entrypoint", "tune", entrypoint[4], entrypoint[5:]))
    return runs


RUNS = referenced_runs()


def test_every_cluster_file_names_a_config():
    named = {file.split(":")[0] for file, *_ in RUNS}
    assert named >= {"aws.yaml", "gcp.yaml", "raycluster.yaml", "rayjob.yaml", "README.md"}


@pytest.mark.parametrize(
    "where,verb,config,overrides", RUNS, ids=[f"{r[0]}:{Path(r[2]).name}" for r in RUNS]
)
def test_configs_the_cluster_files_run_exist_and_validate(where, verb, config, overrides):
    mounts = config_mounts()
    mount = next((m for m in mounts if config.startswith(m + "/")), None)
    assert mount, f"{where}: {config} is not under a mounted configs/ ({sorted(mounts)})"
    local = mounts[mount] / config[len(mount) + 1 :]
    assert local.is_file(), f"{where}: {config} -> {local} does not exist"
    cfg = resolve_paths(load_config(local, overrides))  # what the CLI does before Ray starts
    assert cfg.scaling.use_gpu, f"{where}: a GPU cluster run without scaling.use_gpu=true"
    if verb == "tune":
        assert cfg.tune is not None, f"{where}: {config} has no tune: section"
        # every trial's driver writes under output_dir from its own node: it must be shared
        assert cfg.output_dir.startswith(SHARED + "/"), f"{where}: output_dir {cfg.output_dir}"
