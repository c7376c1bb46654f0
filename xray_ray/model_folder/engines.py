"""The two engines' set-up, in one place: TensorFlow for training and the Keras fallback, ONNX Runtime for inference.

Neither engine is imported at module level: a process that only infers with ONNX Runtime
must never import TensorFlow (seconds of start-up and gigabytes of memory), and importing
this module imports neither.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def setup_tensorflow(training: bool = False) -> bool:
    """Import TensorFlow with GPU memory growth set before any op; returns whether a GPU is visible.

    With `training`, mixed precision is switched on where there is a GPU (float32 on CPUs).
    A CUDA_VISIBLE_DEVICES that names an absent GPU simply leaves TensorFlow on the CPU.
    """
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process: growth was set then
            pass
    if training:
        keras.mixed_precision.set_global_policy("mixed_float16" if gpus else "float32")
    return bool(gpus)


def onnx_threads() -> int:
    """Intra-op threads for ONNX Runtime: the CPUs Ray gave this actor or task, else every CPU.

    Ray is only consulted when this process is already a connected Ray worker; nothing
    here imports or starts Ray. A worker with no CPU reserved (an actor's default) gets
    one thread, so it never competes with the tasks Ray scheduled on those cores.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            context = ray.get_runtime_context()
            if context.worker.mode == ray.WORKER_MODE:
                cpus = float(context.get_assigned_resources().get("CPU", 0.0))
                return max(1, math.ceil(cpus - 1e-9))  # 1.5 CPUs: two threads (the rest is a read task's share)
        except Exception as err:  # noqa: BLE001 - an unexpected Ray API change must not stop inference
            log.debug("could not read the CPUs Ray assigned: %s", err)
    return os.cpu_count() or 1


def session_options(threads: int | None = None):
    """The product's ONNX Runtime settings: every graph optimisation, `threads` intra-op threads (default
    `onnx_threads()`), one inter-op thread, sequential execution, the arena and memory patterns on (ORT's
    defaults), quiet logs. benchmarks/bench_ort.py measures the alternatives against exactly these."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or onnx_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def onnx_session(model: bytes | str | Path, threads: int | None = None, gpu: bool = True, options=None):
    """An ONNX Runtime session over a file or serialized bytes with `options` (default `session_options(threads)`),
    CUDA first when `gpu` and available."""
    import onnxruntime as ort

    options = session_options(threads) if options is None else options
    providers = ["CPUExecutionProvider"]
    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=providers)
