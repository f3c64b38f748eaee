"""Prometheus metrics of a worker process, served on a port of its own.

One process per worker (thread pool), so prometheus-client's default registry is the whole
truth. A machine runs several workers (gpu, cpu, train), so a worker whose port
(HEARTCLUSTER_METRICS_PORT) is taken serves on the next free one of METRICS_PORT_SPAN ports and
logs which. The fine-tune trainer reports through FINETUNE_STEPS and FINETUNE_LOSS.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from shared.core.jobs import Job
from shared.core.progress import Progress
from shared.ml.generation.scheduler import STAGE as GENERATING

log = logging.getLogger(__name__)

METRICS_PORT_SPAN = 32
_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

JOBS = Counter(
    "heartcluster_jobs_total",
    "Jobs this worker ended, by type, tenant and final state",
    ["type", "tenant", "state"],
)
QUEUE_WAIT = Histogram(
    "heartcluster_job_queue_wait_seconds",
    "From submit to a worker starting the job, by type",
    ["type"],
    buckets=_SECONDS,
)
RUN_TIME = Histogram(
    "heartcluster_job_run_seconds",
    "From a worker starting the job to its final state, by type and state",
    ["type", "state"],
    buckets=_SECONDS,
)
ENGINE_FRAMES = Counter(
    "heartcluster_engine_frames_total", "Frames the generation engine produced (rate: frames/s)"
)
ENGINE_ADMISSIONS = Counter(
    "heartcluster_engine_admissions_total", "Requests admitted into the engine's batch"
)
CODEC_SECONDS = Counter(
    "heartcluster_codec_decoded_seconds_total", "Seconds of audio the codec decoded"
)
CODEC_BATCH = Histogram(
    "heartcluster_codec_batch_songs",
    "Songs whose windows one codec estimator batch solved together",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
FINETUNE_STEPS = Counter(
    "heartcluster_finetune_steps_total", "Fine-tune optimizer steps (rate: steps/s)", ["job_type"]
)
FINETUNE_LOSS = Gauge(
    "heartcluster_finetune_loss", "The latest fine-tune training loss", ["job_type"]
)


class _Resources(Collector):
    """Read when scraped: batch rows in use (an engine that is loaded), songs the codec is
    decoding (when loaded) and GPU memory."""

    def __init__(self, models: object) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        engine = getattr(self.models, "_engine", None)
        if engine is not None:
            rows = GaugeMetricFamily(
                "heartcluster_engine_rows", "Engine batch rows, by use", labels=["use"]
            )
            free = len(engine.scheduler.free_rows)
            rows.add_metric(["busy"], engine.max_rows - free)
            rows.add_metric(["free"], free)
            yield rows
            waiting = GaugeMetricFamily(
                "heartcluster_engine_waiting_requests", "Requests waiting for free rows"
            )
            waiting.add_metric([], engine.pending_requests)
            yield waiting
        batcher = getattr(self.models, "_batcher", None)
        if batcher is not None:
            decoding = GaugeMetricFamily(
                "heartcluster_codec_songs", "Songs the codec is decoding (in a batch or waiting)"
            )
            decoding.add_metric([], batcher.songs_decoding)
            yield decoding
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            memory = GaugeMetricFamily(
                "heartcluster_gpu_memory_bytes",
                "GPU memory held by this process's tensors (allocated) and its cache (reserved)",
                labels=["device", "kind"],
            )
            for index in range(torch.cuda.device_count()):
                memory.add_metric([str(index), "allocated"], torch.cuda.memory_allocated(index))
                memory.add_metric([str(index), "reserved"], torch.cuda.memory_reserved(index))
            yield memory


def serve(port: int, models: object) -> int | None:
    """Serve /metrics on `port` or the next free port after it; None when off (port 0)."""
    if port == 0:
        return None
    REGISTRY.register(_Resources(models))
    for candidate in range(port, min(port + METRICS_PORT_SPAN, 65536)):
        try:
            start_http_server(candidate)
        except OSError:
            continue
        log.info("metrics on port %d (/metrics)", candidate)
        return candidate
    log.warning("no free metrics port in %d-%d; metrics off", port, port + METRICS_PORT_SPAN - 1)
    return None


def job_started(job: Job) -> None:
    if job.started_at is not None:
        QUEUE_WAIT.labels(job.type).observe(max(0.0, job.started_at - job.created_at))


def job_ended(job: Job, state: str) -> None:
    JOBS.labels(job.type, job.tenant, state).inc()
    if job.started_at is not None:
        RUN_TIME.labels(job.type, state).observe(max(0.0, time.time() - job.started_at))


def audio_decoded(seconds: float) -> None:
    CODEC_SECONDS.inc(seconds)


def codec_batch(songs: int) -> None:
    CODEC_BATCH.observe(songs)


def counting_frames(progress: Progress) -> Progress:
    """`progress`, also counting the engine's frames, and an admission at a request's first
    frame (it then holds batch rows)."""
    last = {"frames": 0}

    def report(
        stage: str,
        fraction: float,
        frames_done: int | None = None,
        frames_total: int | None = None,
        message: str = "",
    ) -> None:
        if stage == GENERATING and frames_done is not None and frames_done > last["frames"]:
            if last["frames"] == 0:
                ENGINE_ADMISSIONS.inc()
            ENGINE_FRAMES.inc(frames_done - last["frames"])
            last["frames"] = frames_done
        progress(stage, fraction, frames_done, frames_total, message)

    return report
