"""Undersampling the training index: Ray Data (`training.data.undersample`) against pandas on the driver.

21,000 synthetic index rows with the real database's class proportions (paths and labels,
no images: undersampling works on index rows). Each way runs `--repeats` times after one
warm-up; both must keep the same rows. Ray Data is also timed with its default shuffle
(hash shuffle, 200 partitions), the setting the 20 s measured earlier came from.

Figures: reports/bench/undersample.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd
import ray
from common import print_table, save

from xray_ray.ray_runtime import ray_session
from xray_ray.training import data

CLASS_SIZES = {"COVID": 3616, "Lung_Opacity": 6012, "Normal": 10192, "Viral Pneumonia": 1345}


def index_rows(total: int) -> pd.DataFrame:
    scale = total / sum(CLASS_SIZES.values())
    rows = [{"path": f"/data/{label}/images/{label}-{i}.png", "label": label, "readable": True}
            for label, n in CLASS_SIZES.items() for i in range(round(n * scale))]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0, ignore_index=True)


def timed(run, repeats: int) -> tuple[list[float], pd.DataFrame]:
    result = run()  # warm-up: worker processes, imports
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - started)
    return seconds, result


def on_ray(frame: pd.DataFrame, seed: int, default_shuffle: bool = False) -> pd.DataFrame:
    ds = ray.data.from_pandas(frame)  # index rows: one block, as training.data.prepare does
    if default_shuffle:  # what Ray Data does unless told otherwise: hash shuffle, 200 partitions
        kept = ds.groupby("label").map_groups(data._keep_batch, fn_kwargs={
            "keep": min(data.class_counts(frame).values()), "seed": seed}, batch_format="pandas")
        return kept.to_pandas()
    return data.undersample(ds, seed).to_pandas()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=21000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    frame = index_rows(args.rows)
    pandas_s, reference = timed(lambda: data.undersample_frame(frame, 123), args.repeats)
    ray_s, kept = timed(lambda: on_ray(frame, 123), args.repeats)
    default_s, default_kept = timed(lambda: on_ray(frame, 123, default_shuffle=True), 1)
    same = sorted(kept["path"]) == sorted(reference["path"]) == sorted(default_kept["path"])
    rows = [{"way": "pandas on the driver", "median_s": statistics.median(pandas_s), "runs_s": pandas_s},
            {"way": "Ray Data, sort shuffle, 1 partition per class", "median_s": statistics.median(ray_s),
             "runs_s": ray_s},
            {"way": "Ray Data, default shuffle (200 partitions)", "median_s": statistics.median(default_s),
             "runs_s": default_s}]
    print_table([{k: v for k, v in r.items() if k != "runs_s"} for r in rows])
    print(f"{len(frame)} rows -> {len(kept)} kept ({data.class_counts(kept)}); same rows: {same}")
    print("saved", save("undersample", {"rows": len(frame), "kept": len(kept), "per_class": data.class_counts(kept),
                                        "same_rows_as_pandas": same, "timings": rows,
                                        "cpus": ray.cluster_resources().get("CPU")}))


if __name__ == "__main__":
    with ray_session():
        main()
