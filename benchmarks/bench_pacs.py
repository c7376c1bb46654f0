"""PACS scoring against folder scoring: the same DX instances from Orthanc over DICOMweb and from a folder.

Issue 29. N synthetic DX instances (phantoms at 299 px, 12-bit, one study each, frontal) are
written to a folder as .dcm files and stored in a real Orthanc with its DICOMweb plugin (a
temp server on a free loopback port, as the tests start it). In one lean local Ray, side by
side and repeated:

1. folder: `xray-ray score --archive DIR` over the files;
2. PACS: `xray-ray score --pacs URL --study-date D` over the same instances (QIDO-RS listing,
   WADO-RS fetches in the read tasks);
3. PACS with results: as 2, plus an SR per answer to `--sr-out` and back with `--pacs-store`.

Each run starts from an empty output folder, so nothing is skipped as already scored; times
are from the call to the written report. `ratio_pacs_to_folder` is the folder's seconds over
the PACS's (goal: at least 0.8), per repeat; `sr_ms_per_image` is what writing and storing the
SRs cost per image (the run's `dicom_results` seconds over its answers). The model is the
product's EfficientNetB1 at 240 px (from scratch, as bench_score builds it) unless --backbone
says otherwise. Figures go to reports/bench/pacs.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import print_table, save
from PIL import Image

from tests.dicom_instances import dx_instance
from tests.helpers import train_and_export
from tests.pacs_server import start_orthanc
from xray_ray.config_services import ScoreConfig
from xray_ray.images import synth
from xray_ray.scoring.dicomweb import PacsClient
from xray_ray.scoring.preflight import check_run
from xray_ray.scoring.run import score

STUDY_DATE = "20261201"
UID_ROOT = "1.2.826.0.1.3680043.10.1419.900"


def write_instances(folder: Path, count: int) -> list[bytes]:
    """`count` frontal DX instances made from phantoms, written to `folder` as .dcm files; returns their bytes."""
    phantoms = folder.parent / "phantoms"
    synth.write_dataset(phantoms, per_class=-(-count // 4), size=299, seed=4)
    folder.mkdir(parents=True)
    instances = []
    for i, png in enumerate(sorted(phantoms.glob("*/images/*.png"))[:count]):
        pixels = np.asarray(Image.open(png).convert("L"), np.uint16) * 16
        data = dx_instance(f"{UID_ROOT}.1.{i}", f"{UID_ROOT}.2.{i}", f"{UID_ROOT}.3.{i}", STUDY_DATE, "PA",
                           size=pixels.shape[0], pixels=pixels)
        (folder / f"instance-{i:05d}.dcm").write_bytes(data)
        instances.append(data)
    return instances


def timed_run(settings: ScoreConfig) -> tuple[float, dict]:
    """Seconds from the call to the written report, and the run's summary."""
    started = time.perf_counter()
    summary = score(settings, check_run(settings))
    return time.perf_counter() - started, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=240, help="model input size")
    parser.add_argument("--backbone", default="efficientnetb1")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", type=Path, help="reuse this exported folder (built there when missing)")
    args = parser.parse_args()
    from xray_ray.ray_runtime import ray_session

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or tmp / "model"
        if not model.exists():
            train_and_export(model, args.size, backbone=args.backbone)
        instances = write_instances(tmp / "archive", args.images)
        server = start_orthanc(tmp / "orthanc")
        try:
            credentials = str(server.credentials_file(tmp))
            client = PacsClient(server.dicomweb_url, credentials)
            for start in range(0, len(instances), 50):
                client.store(instances[start:start + 50])
            base = dict(model=str(model), explain=0, run="bench")
            variants = {
                "folder": lambda out: ScoreConfig(archives=[str(tmp / "archive")], out=out, **base),
                "pacs": lambda out: ScoreConfig(pacs=server.dicomweb_url, study_date=STUDY_DATE,
                                                pacs_credentials=credentials, out=out, **base),
                "pacs_with_srs": lambda out: ScoreConfig(pacs=server.dicomweb_url, study_date=STUDY_DATE,
                                                         pacs_credentials=credentials, out=out, pacs_store=True,
                                                         sr_out=str(Path(out) / "sr"), **base),
            }
            rows = []
            with ray_session(num_cpus=os.cpu_count(), log_to_driver=False, profile="lean",
                             temp_dir=tempfile.mkdtemp(prefix="ray_bench_")):
                for repeat in range(args.repeats):
                    row = {"repeat": repeat}
                    for name, settings in variants.items():
                        seconds, summary = timed_run(settings(str(tmp / f"out-{name}-{repeat}")))
                        assert summary["scored"] == len(instances), (name, summary["error_codes"])
                        row[f"{name}_s"] = round(seconds, 2)
                        row[f"{name}_images_per_s"] = round(len(instances) / seconds, 1)
                        if name == "pacs_with_srs":
                            results = summary["dicom_results"]
                            row["sr_ms_per_image"] = results["ms_per_image"]
                            row["srs_stored"] = results.get("sr_stored", 0)
                    row["ratio_pacs_to_folder"] = round(row["folder_s"] / row["pacs_s"], 3)
                    row["ratio_pacs_with_srs_to_folder"] = round(row["folder_s"] / row["pacs_with_srs_s"], 3)
                    rows.append(row)
                    print_table([row])
        finally:
            server.stop()
    ranges = {key: [min(r[key] for r in rows), max(r[key] for r in rows)]
              for key in ("ratio_pacs_to_folder", "ratio_pacs_with_srs_to_folder", "sr_ms_per_image")}
    print_table(rows)
    print("ranges:", ranges)
    print("saved", save("pacs", {"images": len(instances), "size": args.size, "backbone": args.backbone,
                                 "runs": rows, "ranges": ranges}))


if __name__ == "__main__":
    main()
