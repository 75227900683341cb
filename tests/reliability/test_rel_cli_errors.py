"""Bad input that ended in a traceback (issue 14): each is now one line on stderr,
exit 2, naming the key, file, flag or port, and fails before any expensive start-up."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from archer_mcore.cli import main
from archer_mcore.data.arithmetic_tokenizer import build_arithmetic_tokenizer

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo_cpu.yaml"


def _train(tmp_path: Path, *overrides: str) -> list[str]:
    args = ["train", str(DEMO), "-o", f"train.output_dir={tmp_path / 'out'}"]
    args += ["-o", f"warmstart.cache_dir={tmp_path / 'cache'}"]
    for o in overrides:
        args += ["-o", o]
    return args


def _one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err
    return err


def _model_dir(
    tmp_path: Path, config: object | None, raw: str | None = None, tok: bool = True
) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    if raw is not None:
        (d / "config.json").write_text(raw)
    elif config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if tok:
        build_arithmetic_tokenizer(d)
    return d


# ------------------------------------------------------------------ model.path
@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing", "does not exist"),
        ("a_file", "is not a directory"),
        ("no_config", "config.json does not exist"),
        ("malformed", "config.json is not valid JSON"),
        ("not_object", "must hold a JSON object, got list"),
        ("llama", "model_type 'llama' is not supported"),
        ("no_tokenizer", "holds no tokenizer files"),
    ],
)
def test_bad_model_path(tmp_path: Path, capsys, case: str, needle: str) -> None:
    qwen = {"model_type": "qwen3", "vocab_size": 106, "hidden_size": 64}
    path = {
        "missing": lambda: tmp_path / "nope",
        "a_file": lambda: _model_dir(tmp_path, qwen) / "config.json",
        "no_config": lambda: _model_dir(tmp_path, None),
        "malformed": lambda: _model_dir(tmp_path, None, raw='{"model_type": "qwen3",'),
        "not_object": lambda: _model_dir(tmp_path, [1, 2]),
        "llama": lambda: _model_dir(tmp_path, {**qwen, "model_type": "llama"}),
        "no_tokenizer": lambda: _model_dir(tmp_path, qwen, tok=False),
    }[case]()
    t0 = time.perf_counter()
    rc = main(_train(tmp_path, f"model.path={path}"))
    _one_line_error(capsys, rc, "model.path", needle)
    assert time.perf_counter() - t0 < 15


def test_bad_tokenizer_dir_names_model_tokenizer(tmp_path: Path, capsys) -> None:
    rc = main(_train(tmp_path, f"model.tokenizer={tmp_path}"))
    _one_line_error(capsys, rc, "model.tokenizer:", "holds no tokenizer files")


# ------------------------------------------------------------------ data files
def test_bad_data_files(tmp_path: Path, capsys) -> None:
    (tmp_path / "adir").mkdir()
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,answer\n")
    fake = tmp_path / "fake.parquet"
    fake.write_text('{"prompt": "x", "answer": "1"}\n')
    for value, needle in (
        (tmp_path / "adir", "is not a file"),
        (csv, "unsupported suffix '.csv'"),
        (fake, "is not a Parquet file"),
    ):
        rc = main(_train(tmp_path, f"data.train_files=[{value}]", "eval.every=0"))
        _one_line_error(capsys, rc, "data.train_files:", str(value), needle)
    rc = main(_train(tmp_path, f"data.train_files=[{tmp_path / 'x.jsonl'}]", "eval.every=0"))
    _one_line_error(capsys, rc, "does not exist")
    rc = main(_train(tmp_path, f"data.eval_files=[{fake}]"))
    _one_line_error(capsys, rc, "data.eval_files:", "is not a Parquet file")
    # archer eval's --data gets the same checks, before the checkpoint or the model
    rc = main(["eval", str(DEMO), "--checkpoint", str(tmp_path), "--data", str(fake)])
    _one_line_error(capsys, rc, "--data:", "is not a Parquet file")


def test_a_real_parquet_file_passes_the_check(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    from archer_mcore.train.preflight import check_data_files

    path = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"prompt": ["Compute 1+1."], "answer": ["2"]}), path)
    check_data_files([str(path)], "data.train_files")


# ------------------------------------------------------------------ metrics
def test_metrics_port_in_use(tmp_path: Path, capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.perf_counter()
        rc = main(_train(tmp_path, f"metrics.port={port}"))
        _one_line_error(capsys, rc, "metrics.port:", f"port {port} on 127.0.0.1 is already in use")
        assert time.perf_counter() - t0 < 15
    # nothing was created in the output directory beyond the lock
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_metrics_host_not_on_this_machine(tmp_path: Path, capsys) -> None:
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this machine.
    rc = main(_train(tmp_path, "metrics.host=192.0.2.1"))
    _one_line_error(capsys, rc, "metrics.host:", "'192.0.2.1' is not an address of this machine")
    rc = main(_train(tmp_path, "metrics.host=no-such-host.invalid"))
    _one_line_error(capsys, rc, "metrics.host:", "does not resolve")
    # metrics off: no check
    from archer_mcore.config import load_config
    from archer_mcore.train.preflight import check_metrics_endpoint

    check_metrics_endpoint(load_config(DEMO, ["metrics.enabled=false", "metrics.host=192.0.2.1"]))


# ------------------------------------------------------------------ archer plan
@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--mfu", "0"], "--mfu: 0.0 must be in (0, 1]"),
        (["--mfu", "-0.2"], "--mfu: -0.2 must be in (0, 1]"),
        (["--mfu", "1.5"], "--mfu: 1.5 must be in (0, 1]"),
        (["--mfu", "nan"], "--mfu: nan must be in (0, 1]"),
        (["--mean-response-fraction", "0"], "--mean-response-fraction: 0.0 must be in (0, 1]"),
        (["--mean-response-fraction", "1.01"], "--mean-response-fraction: 1.01 must be in"),
        (["--nodes", "-1"], "--nodes: -1 must be >= 1"),
        (["--nodes", "0"], "--nodes: 0 must be >= 1"),
        (["--gpus-per-node", "-8"], "--gpus-per-node: -8 must be >= 1"),
    ],
)
def test_plan_rejects_impossible_assumptions(capsys, flags: list[str], needle: str) -> None:
    cfg = REPO / "configs" / "qwen3_8b_archer.yaml"
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(cfg), *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_plan_still_accepts_mfu_one(capsys) -> None:
    cfg = REPO / "configs" / "qwen3_8b_archer.yaml"
    rc = main(["plan", str(cfg), "--mfu", "1", "--mean-response-fraction", "1"])
    assert rc in (0, 1) and "fits" in capsys.readouterr().out


# ------------------------------------------------------------------ archer submit
def _submit(tmp_path: Path, *flags: str) -> list[str]:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  run_name: demo\n")
    return ["submit", str(cfg), "--dry-run", "--log-dir", str(tmp_path / "logs"), *flags]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--partition", "gpu\n#SBATCH --qos=top"], "--partition (slurm.partition)"),
        (["--account", "acct\r"], "--account (slurm.account)"),
        (["--job-name", "a\tb"], "--job-name"),
        (["--container-image", "img\x00"], "--container-image"),
        (["--container-mounts", "/a:/b\n"], "--container-mounts"),
        (["--pushgateway", "http://x\x1b[2J"], "--pushgateway"),
        (["--sbatch", "--qos=high\n#SBATCH --exclusive"], "--sbatch"),
        (["--env", "NCCL_DEBUG=INFO\nrm -rf /"], "--env"),
        (["-o", "train.run_name=x\ny"], "--override"),
        (["--python", "python\x7f"], "--python"),
    ],
)
def test_submit_rejects_control_characters(tmp_path: Path, capsys, flags, needle) -> None:
    rc = main(_submit(tmp_path, *flags))
    out, err = capsys.readouterr()
    assert rc == 2, out
    assert out == ""  # no script printed
    assert err.startswith(f"archer submit: {needle}") and "control character" in err, err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--gpus-per-node", "-1"], "--gpus-per-node (slurm.gpus_per_node) -1: must be >= 0"),
        (["--cpus-per-task", "-4"], "--cpus-per-task -4: must be >= 0"),
        (["--time", "4:99:00"], "99 minutes (must be < 60)"),
        (["--time", "10:61"], "61 seconds (must be < 60)"),
        (["--time", "1-25:00:00"], "25 hours (must be < 24)"),
        (["--time", "0"], "is zero"),
        (["--time", "0:00:00"], "is zero"),
    ],
)
def test_submit_rejects_impossible_values(tmp_path: Path, capsys, flags, needle) -> None:
    rc = main(_submit(tmp_path, "--signal-lead", "0", *flags))
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", out
    assert needle in err and err.count("\n") == 1, err


def test_submit_accepts_plain_values(tmp_path: Path, capsys) -> None:
    rc = main(
        _submit(tmp_path, "--partition", "gpu", "--time", "1-12:30:00", "--gpus-per-node", "0")
    )
    out = capsys.readouterr().out
    assert rc == 0 and "#SBATCH --partition=gpu" in out and "#SBATCH --time=1-12:30:00" in out
