"""Every KubeRay manifest validates against its CRD (ray.io/v1) offline, and a broken one does not."""

from __future__ import annotations

import pytest

from tests.deploy.kube import CRD_FILES, SCHEMAS, manifests, the, validate

jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.skipif(not (SCHEMAS / CRD_FILES["RayCluster"]).is_file(),
                                reason=f"KubeRay CRD schemas not present at {SCHEMAS} (set XRAY_RAY_KUBERAY_SCHEMAS)")


def test_the_manifests_hold_one_object_of_each_kuberay_kind():
    assert {kind: len(manifests().get(kind, [])) for kind in CRD_FILES} == {kind: 1 for kind in CRD_FILES}


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_manifest_validates_against_its_crd(kind):
    validate(the(kind))


def _misspelt_field(cluster):
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["toleration"] = worker.pop("tolerations")


def _wrong_type(cluster):
    cluster["spec"]["workerGroupSpecs"][0]["minReplicas"] = "zero"


def _missing_required(cluster):
    del cluster["spec"]["workerGroupSpecs"][0]["groupName"]


def _unknown_auth_mode(cluster):
    cluster["spec"]["authOptions"]["mode"] = "password"


def _wrong_api_version(cluster):
    cluster["apiVersion"] = "ray.io/v1alpha2"


@pytest.mark.parametrize("breakage", [_misspelt_field, _wrong_type, _missing_required, _unknown_auth_mode,
                                      _wrong_api_version])
def test_a_broken_manifest_is_rejected(breakage):
    cluster = the("RayCluster")
    validate(cluster)
    breakage(cluster)
    with pytest.raises(jsonschema.ValidationError):
        validate(cluster)


def test_a_misspelt_field_deep_in_a_job_template_is_rejected():
    cron = the("RayCronJob")
    cron["spec"]["jobTemplate"]["entrypoints"] = cron["spec"]["jobTemplate"].pop("entrypoint")
    with pytest.raises(jsonschema.ValidationError, match="entrypoints"):
        validate(cron)
