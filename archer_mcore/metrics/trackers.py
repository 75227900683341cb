"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, besides metrics.jsonl
and Prometheus (`metrics.trackers`).

Rank 0 wraps its metrics sink (the Prometheus exporter, or none) in a `TrackerSink`,
which hands every row written to metrics.jsonl, with the same keys and values, to each
configured tracker through the tracker's own library:

- ``tensorboard``: torch's `SummaryWriter`, one scalar per key, into
  ``metrics.tensorboard_dir`` (default ``<train.output_dir>/tensorboard``), a
  sub-directory per run;
- ``wandb``: `wandb.init` / `Run.log` (``WANDB_MODE=offline`` keeps it on disk, under
  ``<train.output_dir>/wandb``), project ``metrics.tracker_project``;
- ``mlflow``: `MlflowClient` against ``metrics.mlflow_tracking_uri``, experiment
  ``metrics.tracker_project``, one `log_batch` per step.

Each tracker starts on the first step it is given. A run that starts at step 1 is a new
tracker run: the resolved config is logged once (a text summary, the W&B config, MLflow
params plus a config.json artifact) and the run ids are stored in
``<train.output_dir>/trackers.json`` (written atomically). A run that starts later
(``--resume`` from a checkpoint) continues the stored runs, same ids, without logging the
config again; TensorBoard drops the events of the steps the resumed run redoes
(`purge_step`).

A tracker that raises (at start, on a step, at close) is reported once on the
``archer.trackers`` logger with the error, and dropped for the rest of the run: it never
stops training. The calls are synchronous; MLflow's HTTP retries are bounded
(`MLFLOW_RETRY_ENV`, unless the environment sets them) so that an unreachable server
costs seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from archer_mcore.config import Config, MetricsConfig, to_dict
from archer_mcore.train.protocols import MetricsSink
from archer_mcore.utils.safe_files import write_atomic

log = logging.getLogger("archer.trackers")

#: the tracker runs' ids, in the run's output directory
RUN_IDS_FILE = "trackers.json"
#: MLflow's HTTP retry settings used unless the environment sets them (its defaults, 7
#: retries with exponential backoff and a 120 s timeout, stall a step for minutes)
MLFLOW_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
#: MLflow limits: params per log_batch call, characters of a param value
_MLFLOW_PARAMS_PER_BATCH = 100
_MLFLOW_PARAM_CHARS = 6000


class Tracker(Protocol):
    """One experiment tracker's run."""

    name: str

    def start(self, run_id: str | None, first_step: int, config: Mapping[str, Any]) -> str:
        """Open the run: continue `run_id` when given, else a new run that logs `config`.
        Returns the run's id."""
        ...

    def log(self, step: int, row: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of a nested config dict."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# ----------------------------------------------------------------------------- trackers
class TensorBoardTracker:
    """Event files through torch.utils.tensorboard's SummaryWriter; the run id is the
    run's sub-directory of `root`."""

    name = "tensorboard"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.writer: Any = None

    def start(self, run_id: str | None, first_step: int, config: Mapping[str, Any]) -> str:
        from torch.utils.tensorboard import SummaryWriter

        new = run_id is None
        run_id = run_id or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        if Path(run_id).name != run_id or run_id.startswith("."):
            raise ValueError(f"{RUN_IDS_FILE}: {run_id!r} is not a run directory's name")
        # purge_step: events at or after the first step of a resumed run are dropped
        # (the steps after the checkpoint that an interrupted run had already logged).
        self.writer = SummaryWriter(
            log_dir=str(self.root / run_id), purge_step=None if new else first_step
        )
        if new:
            text = json.dumps(dict(config), indent=2, sort_keys=False, default=str)
            self.writer.add_text("config", f"```\n{text}\n```", global_step=0)
        return run_id

    def log(self, step: int, row: Mapping[str, float]) -> None:
        for key, value in row.items():
            self.writer.add_scalar(key, float(value), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbTracker:
    """A W&B run through the wandb client; its files under `directory`/wandb."""

    name = "wandb"

    def __init__(self, project: str, run_name: str, directory: Path) -> None:
        self.project = project
        self.run_name = run_name
        self.directory = directory
        self.run: Any = None

    def start(self, run_id: str | None, first_step: int, config: Mapping[str, Any]) -> str:
        import wandb

        self.directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project,
            name=self.run_name,
            id=run_id,  # None: wandb makes one
            resume="allow" if run_id else None,
            config=None if run_id else dict(config),
            dir=str(self.directory),
            settings=wandb.Settings(console="off"),  # the trainer's output stays its own
        )
        return str(self.run.id)

    def log(self, step: int, row: Mapping[str, float]) -> None:
        self.run.log(dict(row), step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class MlflowTracker:
    """An MLflow run through MlflowClient (a tracking server or a local store)."""

    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str, run_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.client: Any = None
        self.run_id = ""

    def start(self, run_id: str | None, first_step: int, config: Mapping[str, Any]) -> str:
        for key, value in MLFLOW_RETRY_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri or None)
        if run_id:
            self.client.get_run(run_id)  # raises when the stored run is gone
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (
            found.experiment_id if found else self.client.create_experiment(self.experiment)
        )
        run = self.client.create_run(experiment_id, run_name=self.run_name)
        self.run_id = run.info.run_id
        params = [
            Param(key, str(value)[:_MLFLOW_PARAM_CHARS]) for key, value in _flatten(config).items()
        ]
        for i in range(0, len(params), _MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + _MLFLOW_PARAMS_PER_BATCH])
        self.client.log_dict(self.run_id, dict(config), "config.json")
        return self.run_id

    def log(self, step: int, row: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in row.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        if self.client is not None and self.run_id:
            self.client.set_terminated(self.run_id)


# ----------------------------------------------------------------------------- the sink
def read_run_ids(output_dir: Path) -> dict[str, str]:
    """The stored tracker run ids ({} when none, or unreadable: a new run then)."""
    path = output_dir / RUN_IDS_FILE
    try:
        ids = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.error("%s unreadable (%s); the trackers start new runs", path, exc)
        return {}
    return {str(k): str(v) for k, v in ids.items()} if isinstance(ids, dict) else {}


class TrackerSink:
    """A MetricsSink that records each step in `inner` (the Prometheus exporter, or
    None) and in every tracker; a tracker's failure is logged once and drops it."""

    def __init__(
        self,
        trackers: list[Tracker],
        inner: MetricsSink | None,
        output_dir: Path,
        config: Mapping[str, Any],
    ) -> None:
        self.trackers = list(trackers)
        self.inner = inner
        self.output_dir = output_dir
        self.config = config
        self.started = False
        self.failed: dict[str, str] = {}  # tracker name -> the error it was dropped for

    def _fail(self, tracker: Tracker, what: str, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        self.failed[tracker.name] = error
        log.error(
            "tracker %s failed (%s) and is dropped for the rest of the run; training goes on: %s",
            tracker.name,
            what,
            error,
        )
        if tracker in self.trackers:
            self.trackers.remove(tracker)
        if what != "close":
            with contextlib.suppress(Exception):  # it failed already: one report is enough
                tracker.close()

    def _start(self, first_step: int) -> None:
        self.started = True
        stored = read_run_ids(self.output_dir) if first_step > 1 else {}
        ids: dict[str, str] = dict(stored)
        for tracker in list(self.trackers):
            try:
                ids[tracker.name] = tracker.start(stored.get(tracker.name), first_step, self.config)
            except Exception as exc:  # a tracker never stops training
                self._fail(tracker, "start", exc)
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.output_dir / RUN_IDS_FILE, json.dumps(ids, indent=1) + "\n")
        except OSError as exc:
            log.error("cannot store the tracker run ids (%s): a --resume starts new runs", exc)

    def record_step(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.inner is not None:
            self.inner.record_step(step, metrics)
        if not self.started:
            self._start(step)
        for tracker in list(self.trackers):
            try:
                tracker.log(step, metrics)
            except Exception as exc:  # a tracker never stops training
                self._fail(tracker, f"step {step}", exc)

    def close(self, delete_push_group: bool = True) -> None:
        if self.inner is not None:
            self.inner.close(delete_push_group=delete_push_group)
        for tracker in list(self.trackers):
            try:
                tracker.close()
            except Exception as exc:
                self._fail(tracker, "close", exc)


def build_trackers(m: MetricsConfig, output_dir: Path, run_name: str) -> list[Tracker]:
    """The trackers `metrics.trackers` lists, in its order."""
    trackers: list[Tracker] = []
    for name in m.trackers:
        if name == "tensorboard":
            root = Path(m.tensorboard_dir) if m.tensorboard_dir else output_dir / "tensorboard"
            trackers.append(TensorBoardTracker(root))
        elif name == "wandb":
            trackers.append(WandbTracker(m.tracker_project, run_name, output_dir))
        elif name == "mlflow":
            trackers.append(MlflowTracker(m.mlflow_tracking_uri, m.tracker_project, run_name))
    return trackers


def with_trackers(cfg: Config, inner: MetricsSink | None) -> MetricsSink | None:
    """Rank 0's metrics sink: `inner` itself without trackers, else a TrackerSink."""
    if not cfg.metrics.trackers:
        return inner
    out = Path(cfg.train.output_dir)
    trackers = build_trackers(cfg.metrics, out, cfg.train.run_name)
    return TrackerSink(trackers, inner, out, to_dict(cfg))
