"""metrics.trackers (archer_mcore/metrics/trackers.py): TensorBoard, W&B and MLflow get
every metrics.jsonl row, read back here through each library's own reader.

The end-to-end tests run the real trainer (`archer train` on configs/demo_cpu.yaml, a
few steps) with the trackers on, then `--resume` for one more step, and compare what
each tracker stored with metrics.jsonl, step by step:

- TensorBoard: the event files, read with tensorboard's EventAccumulator;
- W&B: offline mode (WANDB_MODE=offline), the run's .wandb files read with the wandb
  client's own datastore reader (`wandb.sdk.internal.datastore`, the file `wandb sync`
  uploads from);
- MLflow (when the mlflow client is importable): a real `mlflow server` started here on
  127.0.0.1 (SQLite store; needs the full mlflow package, ~20 s to start) and stopped by
  its process group, else a local file store; read back with MlflowClient.

A broken tracker (a TensorBoard directory that is a file; an MLflow server that is not
there) is reported once on stderr and the run still finishes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from archer_mcore.config import ConfigError, config_from_dict
from archer_mcore.config import checks as config_checks
from archer_mcore.metrics.trackers import RUN_IDS_FILE, TrackerSink, build_trackers

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo_cpu.yaml"
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
# `mlflow server` needs the full mlflow package (Flask, SQLAlchemy), not mlflow-skinny.
HAS_MLFLOW_SERVER = HAS_MLFLOW and all(
    importlib.util.find_spec(m) is not None for m in ("flask", "sqlalchemy", "alembic")
)

# A few small steps of the CPU demo: no warm start, every group trained on (so the loss
# keys are in the rows), one checkpoint at step 2 for the resume.
SHORT = (
    "train.torch_threads=1",
    "warmstart.steps=0",
    "data.synthetic_train_size=256",
    "data.synthetic_eval_size=16",
    "train.prompts_per_step=4",
    "train.mini_batch_prompts=4",
    "rollout.n_samples_per_prompt=4",
    "algorithm.group_filter=none",
    "algorithm.entropy_coef=0.01",
    "eval.every=0",
    "checkpoint.save_every=2",
    "checkpoint.keep_last=5",
    "metrics.port=0",
)


# ----------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp / "wandb-data"),
        # an unreachable MLflow server fails after one retry, not after minutes
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="5",
        MLFLOW_ALLOW_FILE_STORE="true",  # mlflow 3.x refuses a file store without it
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _train(
    tmp: Path, out: Path, *overrides: str, resume: bool = False
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-c",
        "import sys; from archer_mcore.cli import main; sys.exit(main(sys.argv[1:]))",
        "train",
        str(DEMO_CONFIG),
    ]
    for o in (
        *SHORT,
        f"warmstart.cache_dir={tmp / 'cache'}",
        f"train.output_dir={out}",
        *overrides,
    ):
        cmd += ["-o", o]
    if resume:
        cmd.append("--resume")
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=400
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 when the full mlflow package is
    installed (stopped by its process group afterwards), else a local file store."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    if not HAS_MLFLOW_SERVER:
        yield (tmp_path / "mlruns").as_uri()
        return
    port = _free_port()
    root = tmp_path / "mlflow-server"
    root.mkdir()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            health = f"http://127.0.0.1:{port}/health"
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2):
                break
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not start in 90 s"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _rows(out: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {int(r["step"]): r for r in rows}


def _tensorboard(run_dir: Path) -> tuple[dict[int, dict[str, float]], list[str]]:
    """{step: {tag: value}} of the scalars and the config texts, read with tensorboard's
    EventAccumulator (every event file of the run's directory)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    steps: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for ev in acc.Scalars(tag):
            steps.setdefault(ev.step, {})[tag] = ev.value
    texts = []
    if "config/text_summary" in acc.Tags()["tensors"]:
        texts = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors("config/text_summary")]
    return steps, texts


def _wandb_records(wandb_file: Path) -> list[Any]:
    """The records of an offline run's .wandb file, through wandb's datastore reader."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    ds = datastore.DataStore()
    ds.open_for_scan(str(wandb_file))
    records = []
    while (data := ds.scan_data()) is not None:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        records.append(rec)
    return records


def _key(item: Any) -> str:
    """A history / config item's key ("a/b" keys are stored as nested_key ["a", "b"])."""
    return item.key or "/".join(item.nested_key)


def _wandb(out: Path) -> list[dict[str, Any]]:
    """Per offline run directory, in order: its run id, config keys and {step: row}."""
    runs = []
    for run_dir in sorted((out / "wandb").glob("offline-run-*")):
        (wandb_file,) = run_dir.glob("run-*.wandb")
        run: dict[str, Any] = {"id": None, "config": set(), "steps": {}}
        for rec in _wandb_records(wandb_file):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run["id"] = rec.run.run_id
                run["config"] |= {_key(i) for i in rec.run.config.update}
            elif kind == "config":
                run["config"] |= {_key(i) for i in rec.config.update}
            elif kind == "history":
                row = {_key(i): json.loads(i.value_json) for i in rec.history.item}
                run["steps"][rec.history.step.num] = {
                    k: v for k, v in row.items() if not k.startswith("_")
                }
        runs.append(run)
    return runs


def _same_rows(got: Mapping[int, Mapping[str, float]], want: Mapping[int, Mapping[str, float]],
               rel: float = 0.0) -> None:  # fmt: skip
    assert sorted(got) == sorted(want)
    for step, row in want.items():
        assert set(got[step]) == set(row), step
        for key, value in row.items():
            assert got[step][key] == pytest.approx(value, rel=rel, abs=rel), (step, key)


# ----------------------------------------------------------------------------- config
def test_trackers_default_to_none() -> None:
    assert config_from_dict({}).metrics.trackers == []


def test_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(config_checks.TRACKER_LIBRARIES, "wandb", ("no_such_wandb_module", "wandb"))
    with pytest.raises(ConfigError) as err:
        config_from_dict({"metrics": {"trackers": ["tensorboard", "wandb"]}})
    msg = str(err.value)
    assert "metrics.trackers" in msg and "pip install 'archer-mcore[wandb]'" in msg


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.trackers\[0\] must be one of"):
        config_from_dict({"metrics": {"trackers": ["neptune"]}})
    with pytest.raises(ConfigError, match="metrics.trackers lists tensorboard more than once"):
        config_from_dict({"metrics": {"trackers": ["tensorboard", "tensorboard"]}})
    with pytest.raises(ConfigError, match="metrics.tracker_project must not be empty"):
        config_from_dict({"metrics": {"trackers": ["wandb"], "tracker_project": ""}})


def test_tensorboard_dir_setting(tmp_path: Path) -> None:
    m = config_from_dict({"metrics": {"trackers": ["tensorboard"]}}).metrics
    (tb,) = build_trackers(m, tmp_path / "out", "r")
    assert tb.root == tmp_path / "out" / "tensorboard"  # type: ignore[attr-defined]
    m.tensorboard_dir = str(tmp_path / "tb")
    (tb,) = build_trackers(m, tmp_path / "out", "r")
    assert tb.root == tmp_path / "tb"  # type: ignore[attr-defined]


def test_tensorboard_refuses_a_stored_id_outside_its_directory(tmp_path: Path) -> None:
    from archer_mcore.metrics.trackers import TensorBoardTracker

    with pytest.raises(ValueError, match="not a run directory's name"):
        TensorBoardTracker(tmp_path / "tb").start("../elsewhere", 3, {})
    assert not (tmp_path / "elsewhere").exists()


# ----------------------------------------------------------------------------- the sink
class _Fake:
    def __init__(self, name: str, fail_on: str = "") -> None:
        self.name = name
        self.fail_on = fail_on
        self.calls: list[tuple[Any, ...]] = []

    def start(self, run_id: str | None, first_step: int, config: Mapping[str, Any]) -> str:
        self.calls.append(("start", run_id, first_step, dict(config)))
        if self.fail_on == "start":
            raise RuntimeError("cannot reach the server")
        return run_id or f"{self.name}-new"

    def log(self, step: int, row: Mapping[str, float]) -> None:
        self.calls.append(("log", step, dict(row)))
        if self.fail_on == "log":
            raise OSError("disk full")

    def close(self) -> None:
        self.calls.append(("close",))


class _Inner:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.closed = False

    def record_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self.steps.append(step)

    def close(self, delete_push_group: bool = True) -> None:
        self.closed = True


def test_sink_logs_a_failure_once_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good, bad_log, bad_start, inner = _Fake("a"), _Fake("b", "log"), _Fake("c", "start"), _Inner()
    sink = TrackerSink([good, bad_log, bad_start], inner, tmp_path, {"k": 1})  # type: ignore[list-item]
    with caplog.at_level("ERROR", logger="archer.trackers"):
        for step in (1, 2, 3):
            sink.record_step(step, {"x": float(step), "step": float(step)})
        sink.close()
    assert inner.steps == [1, 2, 3] and inner.closed
    assert [c[1] for c in good.calls if c[0] == "log"] == [1, 2, 3]
    assert [c[0] for c in bad_log.calls] == ["start", "log", "close"]  # dropped after step 1
    assert [c[0] for c in bad_start.calls] == ["start", "close"]
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 2, errors
    assert any("tracker b failed (step 1)" in e and "OSError: disk full" in e for e in errors)
    assert any("tracker c failed (start)" in e and "cannot reach the server" in e for e in errors)
    assert sink.failed == {"b": "OSError: disk full", "c": "RuntimeError: cannot reach the server"}
    # the ids of the trackers that started are stored
    assert json.loads((tmp_path / RUN_IDS_FILE).read_text()) == {"a": "a-new", "b": "b-new"}


def test_sink_resumes_stored_runs_only_after_step_one(tmp_path: Path) -> None:
    (tmp_path / RUN_IDS_FILE).write_text(json.dumps({"a": "old-a"}))
    fresh = _Fake("a")
    TrackerSink([fresh], None, tmp_path, {"k": 1}).record_step(1, {"x": 1.0})  # type: ignore[list-item]
    assert fresh.calls[0][:3] == ("start", None, 1)  # step 1: a new run, whatever is stored
    assert json.loads((tmp_path / RUN_IDS_FILE).read_text()) == {"a": "a-new"}
    resumed, other = _Fake("a"), _Fake("z")
    TrackerSink([resumed, other], None, tmp_path, {}).record_step(5, {"x": 5.0})  # type: ignore[list-item]
    assert resumed.calls[0][:3] == ("start", "a-new", 5)
    assert other.calls[0][:3] == ("start", None, 5)  # a tracker added on resume starts anew
    assert json.loads((tmp_path / RUN_IDS_FILE).read_text()) == {"a": "a-new", "z": "z-new"}


@pytest.mark.skipif(
    not HAS_MLFLOW,
    reason="the mlflow client is not installed (pip install 'archer-mcore[mlflow]'); "
    "the end-to-end test runs without its MLflow part",
)
def test_mlflow_tracker_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MlflowTracker alone against a file store: params + config.json once, metrics per
    step, the same run continued, FINISHED at close."""
    from mlflow.tracking import MlflowClient

    from archer_mcore.metrics.trackers import MlflowTracker

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    config = {"train": {"run_name": "r", "steps": 3}, "metrics": {"trackers": ["mlflow"]}}
    first = MlflowTracker(uri, "exp", "r")
    run_id = first.start(None, 1, config)
    first.log(1, {"reward/mean": 0.25, "step": 1.0})
    first.close()
    again = MlflowTracker(uri, "exp", "r")
    assert again.start(run_id, 2, config) == run_id
    again.log(2, {"reward/mean": 0.5, "step": 2.0})
    again.close()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {
        "train.run_name": "r", "train.steps": "3", "metrics.trackers": "['mlflow']"
    }  # fmt: skip
    history = client.get_metric_history(run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.json"]


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trackers_receive_metrics_jsonl_and_resume_the_same_runs(
    tmp_path: Path, mlflow_uri: str
) -> None:
    out = tmp_path / "run"
    trackers = ["tensorboard", "wandb", *(["mlflow"] if HAS_MLFLOW else [])]
    common = [
        f"metrics.trackers=[{','.join(trackers)}]",
        "metrics.tracker_project=archer-test",
        f"metrics.mlflow_tracking_uri={mlflow_uri}",
    ]
    _train(tmp_path, out, *common, "train.steps=2")
    first_ids = json.loads((out / RUN_IDS_FILE).read_text())
    assert sorted(first_ids) == sorted(trackers)
    resumed = _train(tmp_path, out, *common, "train.steps=3", resume=True)
    assert "archer.trackers" not in resumed.stderr, resumed.stderr[-3000:]
    assert json.loads((out / RUN_IDS_FILE).read_text()) == first_ids  # the same runs
    rows = _rows(out)
    assert sorted(rows) == [1, 2, 3]
    assert "loss/policy" in rows[1] or any(k.startswith("loss/") for k in rows[1]), rows[1]

    # TensorBoard: one run directory (the same one after the resume), every key of
    # every step (float32 in the event files), the config text once.
    tb_runs = sorted(p.name for p in (out / "tensorboard").iterdir())
    assert tb_runs == [first_ids["tensorboard"]]
    tb_steps, texts = _tensorboard(out / "tensorboard" / tb_runs[0])
    _same_rows(tb_steps, rows, rel=1e-6)
    assert len(texts) == 1 and '"run_name": "demo_cpu"' in texts[0]
    assert len(list((out / "tensorboard" / tb_runs[0]).glob("events.out.tfevents.*"))) == 2

    # W&B: two offline segments of the same run id; the config in the first only.
    runs = _wandb(out)
    assert [r["id"] for r in runs] == [first_ids["wandb"]] * 2
    assert {"train", "metrics", "model"} <= runs[0]["config"]
    assert not {"train", "metrics", "model"} & runs[1]["config"]
    _same_rows({**runs[0]["steps"], **runs[1]["steps"]}, rows)
    assert sorted(runs[1]["steps"]) == [3]

    if HAS_MLFLOW:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_uri)
        run = client.get_run(first_ids["mlflow"])
        assert run.info.status == "FINISHED" and run.info.run_name == "demo_cpu"
        exp = client.get_experiment(run.info.experiment_id)
        assert exp.name == "archer-test"
        assert run.data.params["train.run_name"] == "demo_cpu"
        assert run.data.params["metrics.trackers"] == str(trackers)
        got: dict[int, dict[str, float]] = {}
        for key in run.data.metrics:
            for m in client.get_metric_history(run.info.run_id, key):
                got.setdefault(m.step, {})[key] = m.value
        _same_rows(got, rows)
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.json"]
        (found,) = client.search_runs([exp.experiment_id])  # one run, not one per start
        assert found.info.run_id == first_ids["mlflow"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_broken_tracker_is_reported_once_and_training_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    not_a_dir = tmp_path / "tb-is-a-file"
    not_a_dir.write_text("")
    trackers = ["tensorboard", "wandb", *(["mlflow"] if HAS_MLFLOW else [])]
    proc = _train(
        tmp_path,
        out,
        f"metrics.trackers=[{','.join(trackers)}]",
        f"metrics.tensorboard_dir={not_a_dir}",
        f"metrics.mlflow_tracking_uri=http://127.0.0.1:{_free_port()}",
        "train.steps=2",
    )
    failures = [ln for ln in proc.stderr.splitlines() if "archer.trackers: tracker" in ln]
    broken = ["tensorboard", *(["mlflow"] if HAS_MLFLOW else [])]
    assert [ln.split("tracker ", 1)[1].split(" ", 1)[0] for ln in failures] == broken, proc.stderr
    assert all("dropped for the rest of the run" in ln for ln in failures)
    assert "NotADirectoryError" in failures[0] or "FileExistsError" in failures[0], failures
    assert sorted(_rows(out)) == [1, 2]
    (run,) = _wandb(out)  # the healthy tracker went on
    _same_rows(run["steps"], _rows(out))
    assert json.loads((out / RUN_IDS_FILE).read_text()) == {"wandb": run["id"]}
    with contextlib.suppress(FileNotFoundError):
        assert not any((out / "tensorboard").iterdir())
