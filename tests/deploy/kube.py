"""Reading the Kubernetes manifests of deploy/kubernetes/ and KubeRay's CRD schemas, offline.

KubeRay's CRDs (ray.io/v1) are read where the project keeps them, beside the repository in
`../shared/schemas/kuberay/` (or `$XRAY_RAY_KUBERAY_SCHEMAS`), never copied in. A CRD's
openAPIV3Schema lists each object's fields without forbidding others, because the API server
prunes or, under kubectl's default strict field validation, rejects unknown fields itself;
`strict` adds that rule so a misspelt field fails here as it would on `kubectl apply`.
"""

from __future__ import annotations

import copy
import os
import re
from functools import cache
from pathlib import Path

import yaml

from tests.helpers import REPO

MANIFESTS = REPO / "deploy" / "kubernetes"
SCHEMAS = Path(os.environ.get("XRAY_RAY_KUBERAY_SCHEMAS", REPO.parent / "shared" / "schemas" / "kuberay"))

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
"""The KubeRay kinds, and the file of KubeRay's repository holding each one's CRD."""

RAY_AUTH_SECRET = "xray-ray-auth"


def _load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader) if doc]


@cache
def manifests() -> dict[str, list[dict]]:
    """Every object of every manifest file, by kind."""
    by_kind: dict[str, list[dict]] = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in _load_all(path):
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def the(kind: str) -> dict:
    """The one object of `kind` in the manifests (a copy, free to modify)."""
    (obj,) = manifests()[kind]
    return copy.deepcopy(obj)


@cache
def crd_schema(kind: str) -> dict:
    """The openAPIV3Schema of `kind`'s served, stored version v1, made strict."""
    (crd,) = _load_all(SCHEMAS / CRD_FILES[kind])
    assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    return strict(version["schema"]["openAPIV3Schema"])


def strict(schema):
    """The schema with unknown fields refused wherever it lists an object's fields (kubectl's strict
    field validation), except where the CRD keeps unknown fields on purpose."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        result["additionalProperties"] = False
    return result


def validate(obj: dict) -> None:
    """Raise jsonschema.ValidationError unless `obj` is a valid ray.io/v1 object of its kind."""
    import jsonschema

    if obj.get("apiVersion") != "ray.io/v1":
        raise jsonschema.ValidationError(f"apiVersion must be ray.io/v1, got {obj.get('apiVersion')!r}")
    if not obj.get("metadata", {}).get("name"):
        raise jsonschema.ValidationError("metadata.name is required")
    schema = crd_schema(obj["kind"])
    jsonschema.validators.validator_for(schema)(schema).validate(obj)


def ray_clusters() -> dict[str, dict]:
    """The Ray cluster specs the manifests define: the RayCluster's and the RayService's."""
    return {"RayCluster": the("RayCluster")["spec"], "RayService": the("RayService")["spec"]["rayClusterConfig"]}


def pod_templates(cluster: dict) -> list[dict]:
    """The pod specs of a Ray cluster spec: the head's, then each worker group's."""
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [group["template"]["spec"] for group in groups]


def mounts(pod: dict) -> dict[str, tuple[dict, dict]]:
    """The Ray container's mounts by path: (volumeMount, the pod volume it mounts)."""
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    (container,) = pod["containers"]
    return {mount["mountPath"]: (mount, volumes[mount["name"]]) for mount in container.get("volumeMounts", [])}


def env(pod: dict) -> dict[str, str]:
    (container,) = pod["containers"]
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def readme_section(title: str) -> str:
    """The text of the section headed `title` (any level) in the README or a page of docs/, up to the next
    heading (a `#` line inside a code block is a shell comment, not a heading)."""
    sections: dict[str, list[str]] = {}
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        current, in_code = None, False
        for line in page.read_text().splitlines():
            in_code ^= line.lstrip().startswith("```")
            heading = None if in_code else re.match(r"#+ (.*)", line)
            if heading:
                current = sections.setdefault(heading.group(1).strip(), [])
            elif current is not None:
                current.append(line)
    assert title in sections, f"neither the README nor docs/ has a section {title!r}"
    return "\n".join(sections[title]) + "\n"


def readme_command(title: str, script: str) -> str:
    """The `python <script> ...` command in the code blocks of a README or docs/ section, continuation lines
    joined and a trailing output redirection dropped, whitespace normalised."""
    blocks = "\n".join(re.findall(r"```[^\n]*\n(.*?)```", readme_section(title), flags=re.DOTALL))
    joined = re.sub(r"\\\n\s*", " ", blocks)
    (command,) = re.findall(rf"python {re.escape(script)}[^\n>]*", joined)
    return " ".join(command.split())
