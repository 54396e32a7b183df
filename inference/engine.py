"""The ONNX Runtime engine: one session per process, micro-batched, thread-safe.

Why micro-batching: the worker and ``pneumo infer`` call :meth:`InferenceEngine.predict` from
several threads (one per job). Running each image alone leaves throughput on the table; one
background thread collects the tensors that arrive within ``max_wait_ms`` (up to ``max_batch``),
runs them as one batch and hands each caller its own row through a future. A lone caller waits at
most ``max_wait_ms`` extra — set it to 0 to disable batching.

ONNX Runtime's ``InferenceSession.run`` is itself thread-safe, but funnelling all calls through one
thread also keeps the intra-op thread pool from being oversubscribed on a 2-core node.
The session is created and warmed up in the constructor, so the first real image does not pay for
graph optimisation and allocation.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from inference.errors import EngineError, ModelPackageError
from inference.manifest import ModelManifest

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
_STOP = object()


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Runtime knobs. ``intra_op_threads`` 0 lets ONNX Runtime choose (one per core).

    ``allow_spinning`` False: ONNX Runtime's worker threads otherwise busy-wait after each run,
    which on a 2-core node steals the CPU from decoding/preprocessing the next image (measured:
    decode+preprocess of the RG1 CR took ~3x longer next to a spinning EfficientNet-B0 session).
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    allow_cuda: bool = True
    max_batch: int = 8
    max_wait_ms: float = 2.0
    warmup: bool = True
    allow_spinning: bool = False

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("thread counts must be >= 0")


@dataclass(frozen=True, slots=True, eq=False)
class Prediction:
    """One image's result. ``probability`` and ``threshold`` are on the calibrated scale
    (:mod:`inference.calibration`); the label was decided on the raw output against the raw
    threshold, which is the same decision without float rounding at the boundary.
    ``timings_ms``: decode, preprocess (from the caller), infer (the
    wall time of the batch run that included this image); ``batch_size`` that batch's size.
    ``cam`` is read-only. Compared by identity (it holds an array)."""

    probability: float
    label: str
    threshold: float
    model_id: str
    model_version: str
    cam: npt.NDArray[np.float32]
    timings_ms: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    batch_size: int = 1
    #: The network's own sigmoid output before calibration (``probability`` is calibrated).
    raw_probability: float | None = None


def select_providers(allow_cuda: bool, available: Sequence[str] | None = None) -> list[str]:
    """CUDA first when ONNX Runtime reports it and it is allowed; CPU always as the fallback."""
    have = list(available) if available is not None else ort.get_available_providers()
    if allow_cuda and CUDA_PROVIDER in have:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


@dataclass(slots=True)
class _Request:
    tensor: npt.NDArray[np.float32]
    future: Future[tuple[float, npt.NDArray[np.float32], float, int]]


class InferenceEngine:
    """Owns the ONNX Runtime session and the batching thread. Close it (or use ``with``)."""

    def __init__(self, manifest: ModelManifest, options: EngineOptions | None = None) -> None:
        self.manifest = manifest
        self.options = options or EngineOptions()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.intra_op_threads
        so.inter_op_num_threads = self.options.inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spin = "1" if self.options.allow_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        self.providers = select_providers(self.options.allow_cuda)
        try:
            self._session = ort.InferenceSession(
                str(manifest.onnx_path), sess_options=so, providers=self.providers
            )
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ModelPackageError(
                f"ONNX Runtime cannot load {manifest.onnx_file}: {type(exc).__name__}: {exc}"
            ) from exc
        self._check_graph()
        self._height = manifest.preprocessing.height
        self._width = manifest.preprocessing.width
        self.max_batch = self._effective_max_batch()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        if self.options.warmup:
            self._warm_up()
        self._thread = threading.Thread(target=self._serve, name="inference-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ set-up

    def _check_graph(self) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        m = self.manifest
        if m.input_name not in inputs:
            raise ModelPackageError(
                f"model.json 'input.name' {m.input_name!r} is not a graph input ({sorted(inputs)})"
            )
        for key, spec in (("probability", m.probability), ("cam", m.cam)):
            if spec.name not in outputs:
                raise ModelPackageError(
                    f"model.json 'outputs.{key}.name' {spec.name!r} is not a graph output "
                    f"({sorted(outputs)})"
                )

    def _effective_max_batch(self) -> int:
        """A graph exported with a fixed batch dimension of 1 cannot be batched."""
        for graph_input in self._session.get_inputs():
            if graph_input.name == self.manifest.input_name and graph_input.shape[0] == 1:
                return 1
        return self.options.max_batch

    def _warm_up(self) -> None:
        for n in sorted({1, self.max_batch}):
            self._run(np.zeros((n, 1, self._height, self._width), dtype=np.float32))

    # ------------------------------------------------------------------ running

    def _run(
        self, batch: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        m = self.manifest
        prob, cam = self._session.run(
            [m.probability.name, m.cam.name], {m.input_name: batch}
        )
        prob = np.asarray(prob, dtype=np.float32).reshape(batch.shape[0])
        cam = np.asarray(cam, dtype=np.float32).reshape(batch.shape[0], *cam.shape[-2:])
        return prob, cam

    def _serve(self) -> None:
        """Batching loop: block for the first request, then gather until full or deadline."""
        wait_s = self.options.max_wait_ms / 1e3
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            pending: list[_Request] = [first]
            deadline = time.perf_counter() + wait_s
            stop = False
            while len(pending) < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    if remaining > 0:
                        item = self._queue.get(timeout=remaining)
                    else:
                        item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                pending.append(item)
            self._run_pending(pending)
            if stop:
                return

    def _run_pending(self, pending: list[_Request]) -> None:
        live = [r for r in pending if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        t0 = time.perf_counter()
        try:
            prob, cam = self._run(np.stack([r.tensor for r in live])[:, None, :, :])
        except Exception as exc:  # noqa: BLE001 - hand every caller the failure
            err = EngineError(f"inference failed: {type(exc).__name__}: {exc}")
            for r in live:
                r.future.set_exception(err)
            return
        infer_ms = (time.perf_counter() - t0) * 1e3
        for i, r in enumerate(live):
            row = cam[i].copy()
            row.flags.writeable = False
            r.future.set_result((float(prob[i]), row, infer_ms, len(live)))

    def _validate(self, tensor: npt.ArrayLike) -> npt.NDArray[np.float32]:
        arr = np.asarray(tensor, dtype=np.float32)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.shape != (self._height, self._width):
            raise EngineError(
                f"tensor must have shape ({self._height}, {self._width}) or "
                f"(1, {self._height}, {self._width}), got {arr.shape}"
            )
        if not np.isfinite(arr).all():
            raise EngineError("tensor contains NaN or infinity")
        return np.ascontiguousarray(arr)

    def submit(
        self, tensor: npt.ArrayLike
    ) -> Future[tuple[float, npt.NDArray[np.float32], float, int]]:
        """Queue one tensor; the future yields (probability, cam, infer_ms, batch_size)."""
        arr = self._validate(tensor)
        fut: Future[tuple[float, npt.NDArray[np.float32], float, int]] = Future()
        with self._lock:
            if self._closed:
                raise EngineError("the inference engine is closed")
            self._queue.put(_Request(arr, fut))
        return fut

    def _prediction(
        self,
        result: tuple[float, npt.NDArray[np.float32], float, int],
        timings_ms: Mapping[str, float] | None,
    ) -> Prediction:
        raw, cam, infer_ms, batch_size = result
        m = self.manifest
        label = m.positive_label if raw >= m.network_threshold else m.negative_label
        timings = {"decode": 0.0, "preprocess": 0.0}
        if timings_ms:
            timings.update({k: float(v) for k, v in timings_ms.items()})
        timings["infer"] = infer_ms
        return Prediction(
            probability=m.calibration.apply(raw),
            raw_probability=raw,
            label=label,
            threshold=m.threshold,
            model_id=m.id,
            model_version=m.version,
            cam=cam,
            timings_ms=MappingProxyType(timings),
            batch_size=batch_size,
        )

    def predict(
        self, tensor: npt.ArrayLike, timings_ms: Mapping[str, float] | None = None
    ) -> Prediction:
        """Classify one [H, W] tensor (blocking, thread-safe, micro-batched with other callers).

        ``timings_ms`` (decode, preprocess) from the caller's earlier stages are carried into the
        prediction next to ``infer``.
        """
        return self._prediction(self.submit(tensor).result(), timings_ms)

    def predict_batch(self, tensors: Sequence[npt.ArrayLike]) -> list[Prediction]:
        """Classify several tensors; they are queued together and batched by the same thread."""
        futures = [self.submit(t) for t in tensors]
        return [self._prediction(f.result(), None) for f in futures]

    def run_direct(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Bare ``session.run`` on an [N, 1, H, W] batch — the floor the benchmark compares to."""
        return self._run(batch)[0]

    def close(self) -> None:
        """Finish queued work, stop the batching thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
