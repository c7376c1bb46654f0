"""What the manifests promise beyond their CRDs: the README's commands, Ray token auth from a Secret,
GPU workers, pinned images, volumes where the jobs read and write, and the NetworkPolicy.

Kubernetes' own kinds (NetworkPolicy, PersistentVolumeClaim) have no schema beside the project,
so their structure is checked here field by field.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest

from tests.deploy.kube import (
    MANIFESTS,
    RAY_AUTH_SECRET,
    REPO,
    env,
    manifests,
    mounts,
    pod_templates,
    ray_clusters,
    readme_command,
    readme_section,
    the,
)

APP_LABEL = {"app.kubernetes.io/name": "xray-ray"}
GCS_PORT, DASHBOARD_PORT, SERVE_PORT, METRICS_PORT = 6379, 8265, 8000, 8080


def _options(entrypoint: str) -> dict[str, str]:
    words = shlex.split(entrypoint)
    return dict(zip(words[2::2], words[3::2]))


def _mount_for(path: str, pod: dict) -> dict | None:
    matches = [mount for mount_path, (mount, _) in mounts(pod).items() if Path(path).is_relative_to(mount_path)]
    return max(matches, key=lambda mount: len(mount["mountPath"])) if matches else None


def test_the_tuning_job_runs_the_readmes_cluster_command():
    assert the("RayJob")["spec"]["entrypoint"] == readme_command("On a GPU cluster", "jobs/tune.py")
    assert "--config configs/tune_cluster.yaml" in the("RayJob")["spec"]["entrypoint"]


def test_the_nightly_job_runs_the_readmes_scoring_command():
    cron = the("RayCronJob")["spec"]
    assert cron["jobTemplate"]["entrypoint"] == readme_command("Nightly archive scoring", "jobs/score.py")
    assert cron["schedule"].split()[2:] == ["*", "*", "*"]  # every day


def test_jobs_run_on_the_rayclusters_head_with_its_volumes():
    cluster = the("RayCluster")
    head, *workers = pod_templates(cluster["spec"])
    for job in (the("RayJob")["spec"], the("RayCronJob")["spec"]["jobTemplate"]):
        assert job["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert job["submissionMode"] == "HTTPMode"  # no submitter pod needs the dashboard
    tune = _options(the("RayJob")["spec"]["entrypoint"])
    score = _options(the("RayCronJob")["spec"]["jobTemplate"]["entrypoint"])
    assert _mount_for(tune["--index"], head) is not None
    assert not _mount_for(score["--out"], head).get("readOnly"), "outputs and ledger need a writable volume"
    for pod in (head, *workers):  # read tasks and actors run on the workers
        assert _mount_for(score["--archive"], pod)["readOnly"], "the archive must be mounted read-only"
        assert _mount_for(score["--registry"], pod)["readOnly"]
        assert _mount_for(tune["--index"], pod)["readOnly"]
    assert env(head)["XRAY_RAY_HOME"].startswith("/mnt/shared/")  # models and reports outlive the head pod
    assert not _mount_for("/mnt/shared", head).get("readOnly")


def test_ray_token_auth_comes_from_a_secret_in_every_ray_container():
    import ray

    raylet = (Path(ray.__file__).parent / "_raylet.so").read_bytes()  # Ray's C++ token loader reads these names
    assert b"RAY_AUTH_MODE" in raylet and b"RAY_AUTH_TOKEN_PATH" in raylet
    for name, cluster in ray_clusters().items():
        assert cluster["authOptions"] == {"mode": "token", "secretName": RAY_AUTH_SECRET}, name
        for pod in pod_templates(cluster):
            variables = env(pod)
            assert variables["RAY_AUTH_MODE"] == "token"
            token_path = variables["RAY_AUTH_TOKEN_PATH"]
            mount, volume = mounts(pod)[str(Path(token_path).parent)]
            assert mount["readOnly"] and volume["secret"]["secretName"] == RAY_AUTH_SECRET
            assert {"key": "auth_token", "path": Path(token_path).name} in volume["secret"]["items"]
            assert "RAY_AUTH_TOKEN" not in variables  # never a literal token in a manifest


def test_gpu_workers_scale_from_zero_with_gpu_limits_and_tolerations():
    head, *workers = pod_templates(the("RayCluster")["spec"])
    (group,) = the("RayCluster")["spec"]["workerGroupSpecs"]
    (worker,) = workers
    (container,) = worker["containers"]
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    assert the("RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_images_are_pinned_to_the_installed_ray():
    import ray

    for name, cluster in ray_clusters().items():
        assert cluster["rayVersion"] == ray.__version__, name
        for pod in pod_templates(cluster):
            image = pod["containers"][0]["image"]
            assert f"-ray{ray.__version__}-" in image and not image.endswith(":latest"), image
    gpu_image = pod_templates(the("RayCluster")["spec"])[1]["containers"][0]["image"]
    assert gpu_image.endswith("-gpu")
    dockerfile = (MANIFESTS / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray.__version__}-py311-cpu" in dockerfile
    assert f"RAY_IMAGE=rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile and "EXTRAS='[gpu]'" in dockerfile
    assert re.search(r"^RUN pip install .*-c requirements\.lock", dockerfile, flags=re.MULTILINE)


def test_every_ray_pod_carries_the_label_the_network_policies_select():
    for cluster in ray_clusters().values():
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            assert group["template"]["metadata"]["labels"].items() >= APP_LABEL.items()


def _check_network_policy(policy: dict) -> None:
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    assert policy["metadata"]["name"] and set(policy["spec"]) <= {"podSelector", "policyTypes", "ingress", "egress"}
    assert set(policy["spec"]["policyTypes"]) <= {"Ingress", "Egress"}
    for rule in policy["spec"].get("ingress", []):
        assert set(rule) <= {"from", "ports"}
        assert rule.get("from"), "a rule without `from` admits every source"
        for peer in rule["from"]:
            assert peer and set(peer) <= {"podSelector", "namespaceSelector", "ipBlock"}
        for port in rule.get("ports", []):
            assert port["protocol"] in ("TCP", "UDP", "SCTP") and isinstance(port["port"], int)


def test_network_policies_are_well_formed_and_a_broken_one_is_not():
    for policy in manifests()["NetworkPolicy"]:
        _check_network_policy(policy)
    broken = copy.deepcopy(manifests()["NetworkPolicy"][0])
    broken["spec"]["ingress"] = [{"ports": [{"protocol": "TCP", "port": GCS_PORT}]}]
    with pytest.raises(AssertionError, match="every source"):
        _check_network_policy(broken)


def test_dashboard_gcs_and_serve_are_reachable_only_from_where_they_must_be():
    policies = manifests()["NetworkPolicy"]
    assert all(p["spec"]["podSelector"]["matchLabels"].items() >= APP_LABEL.items() for p in policies)
    ports_from: dict[int | None, list[dict]] = {}
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            for port in rule.get("ports", [{"port": None}]):  # None: every port
                ports_from.setdefault(port["port"], []).extend(rule["from"])
    assert ports_from[None] == [{"podSelector": {"matchLabels": APP_LABEL}}]  # Ray-internal traffic, GCS included
    assert GCS_PORT not in ports_from
    (operator,) = ports_from[DASHBOARD_PORT]
    assert operator["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    assert "namespaceSelector" in operator
    assert {"podSelector": {"matchLabels": {"xray-ray/serve-client": "true"}}} in ports_from[SERVE_PORT]
    (prometheus,) = ports_from[METRICS_PORT]  # metrics have no authentication: Prometheus' pods only
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert "namespaceSelector" in prometheus
    assert set(ports_from) == {None, DASHBOARD_PORT, SERVE_PORT, METRICS_PORT}


def test_every_claim_the_pods_mount_is_defined_and_well_formed():
    claims = {claim["metadata"]["name"]: claim for claim in manifests()["PersistentVolumeClaim"]}
    for claim in claims.values():
        assert claim["apiVersion"] == "v1" and set(claim["spec"]) >= {"accessModes", "resources"}
        assert claim["spec"]["resources"]["requests"]["storage"]
    used = {volume["persistentVolumeClaim"]["claimName"]
            for cluster in ray_clusters().values() for pod in pod_templates(cluster)
            for volume in pod.get("volumes", []) if "persistentVolumeClaim" in volume}
    assert used == set(claims)
    shared = claims["xray-ray-shared"]["spec"]["accessModes"]
    assert shared == ["ReadWriteMany"], "every pod writes or reads the shared volume at once"


def test_the_readme_creates_every_secret_and_applies_every_manifest_in_order():
    section = readme_section("Kubernetes (KubeRay)")
    created = set(re.findall(r"kubectl create secret generic (\S+)", section))
    used = {volume["secret"]["secretName"] for cluster in ray_clusters().values() for pod in pod_templates(cluster)
            for volume in pod.get("volumes", []) if "secret" in volume}
    assert used | {cluster["authOptions"]["secretName"] for cluster in ray_clusters().values()} == created
    applied = re.findall(r"kubectl apply -f deploy/kubernetes/([\w.-]+)", section)
    assert sorted(set(applied)) == sorted(path.name for path in MANIFESTS.glob("*.yaml"))
    order = [applied.index(name) for name in ("volumes.yaml", "networkpolicy.yaml", "raycluster.yaml",
                                               "rayjob-tune.yaml")]
    assert order == sorted(order), "volumes and policies before the cluster, the cluster before its jobs"
    assert "docker build -f deploy/kubernetes/Dockerfile" in section
    assert (REPO / "deploy" / "kubernetes" / "Dockerfile.dockerignore").is_file()
