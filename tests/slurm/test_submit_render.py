"""archer submit: rendering and validation (no Slurm needed; the live tests submit)."""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from archer_mcore.cli.submit import add_args as add_submit_args
from archer_mcore.cli.submit import request_from_args
from archer_mcore.cli.submit import run as run_submit
from archer_mcore.launch.slurm import SubmitError, render_script, slurm_time_seconds


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_submit_args(parser)
    return parser.parse_args(list(argv))


def config(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  run_name: demo\n" + text)
    return path


def header(script: str) -> list[str]:
    return [
        line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")
    ]


def exported(script: str) -> dict[str, str]:
    """Run the rendered script's parameter section (everything before the inlined body)
    in a clean bash and read the environment back, NUL-separated."""
    params = script.split("# ---- begin slurm/archer_job.sh")[0]
    out = subprocess.run(
        ["bash", "-c", params + "\nenv -0"],
        capture_output=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    ).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


@pytest.mark.parametrize(
    ("yaml_text", "mode"),
    [
        ("", "train"),
        ("rollout:\n  engine: sglang\n  weight_sync: tensor\n", "colocated"),
        (
            "rollout:\n  engine: sglang\n  mode: disaggregated\nslurm:\n  rollout_nodes: 1\n"
            "model:\n  path: /m\n",
            "disaggregated",
        ),
    ],
)
def test_mode_follows_the_config(tmp_path: Path, yaml_text: str, mode: str) -> None:
    req = request_from_args(parse(str(config(tmp_path, yaml_text)), "--nodes", "2"))
    assert req.mode == mode
    script = render_script(req)
    assert f"from slurm/{mode}.sbatch" in script
    assert f"export ARCHER_MODE={mode}" in script


def test_header_from_flags_and_config(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        "slurm:\n  partition: cfgpart\n  account: acct\n  nodes: 3\n"
        "  time: '2:00:00'\n  extra_sbatch: ['--qos=high']\n",
    )
    req = request_from_args(
        parse(
            str(cfg),
            "--partition",
            "h800",
            "--signal-lead",
            "300",
            "--log-dir",
            str(tmp_path / "logs"),
            "--sbatch=--exclude=n7",
        )
    )
    h = header(render_script(req))
    assert h == [
        "--job-name=archer-demo",
        "--nodes=3",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--exclusive",
        "--partition=h800",
        "--account=acct",
        "--time=2:00:00",
        "--requeue",
        "--signal=B:USR1@300",
        "--open-mode=append",
        f"--output={tmp_path / 'logs'}/%x-%j.out",
        "--qos=high",
        "--exclude=n7",
    ]


def test_cpu_job_has_no_gpu_lines(tmp_path: Path) -> None:
    req = request_from_args(parse(str(config(tmp_path)), "--gpus-per-node", "0", "--nodes", "1"))
    h = header(render_script(req))
    assert not any("gpus" in line or "exclusive" in line for line in h)
    assert req.nproc_per_node == 1


def test_parameters_survive_shell_quoting(tmp_path: Path) -> None:
    weird = 'train.output_dir=runs/it\'s a "dir" $HOME `x`'
    req = request_from_args(
        parse(
            str(config(tmp_path)),
            "--nodes",
            "2",
            "-o",
            weird,
            "-o",
            "train.steps=3",
            "--container-image",
            "nvcr.io/x:1",
            "--container-mounts",
            "/data:/data",
            "--env",
            "NCCL_IB_HCA=mlx5_0,mlx5_1",
            "--pushgateway",
            "http://pg:9091",
        )
    )
    env = exported(render_script(req))
    assert env["ARCHER_OVERRIDES"] == weird + "\ntrain.steps=3"
    assert env["ARCHER_CONFIG"] == str((tmp_path / "run.yaml").resolve())
    assert env["ARCHER_CONTAINER_IMAGE"] == "nvcr.io/x:1"
    assert env["ARCHER_CONTAINER_MOUNTS"] == "/data:/data"
    assert env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
    assert env["ARCHER_PUSHGATEWAY"] == "http://pg:9091"
    assert env["ARCHER_NPROC_PER_NODE"] == "8"


@pytest.mark.parametrize("mode", ["train", "colocated", "disaggregated"])
def test_rendered_script_is_valid_bash_with_the_body_inlined(tmp_path: Path, mode: str) -> None:
    cfg = config(tmp_path, "model:\n  path: /m\n")
    req = request_from_args(parse(str(cfg), "--nodes", "3", "--mode", mode, "--rollout-nodes", "1"))
    script = render_script(req)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert 'archer_job.sh"' not in script.split("# ---- end slurm/archer_job.sh")[1]  # no source
    assert "torch.distributed.run" in script and "--rdzv-backend=c10d" in script
    # every #SBATCH line precedes the first command (sbatch stops reading at it)
    lines = script.splitlines()
    first_cmd = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))
    if mode == "disaggregated":
        assert "export ARCHER_ROLLOUT_NODES=1" in script
        assert "export ARCHER_SGLANG_MODEL=/m" in script


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ("--mode", "disaggregated", "--nodes", "2", "--rollout-nodes", "2"),
            "some nodes must train",
        ),
        (("--mode", "disaggregated", "--nodes", "2", "--rollout-nodes", "0"), "must be >= 1"),
        (("--time", "30", "--signal-lead", "1800"), "not shorter than the time limit"),
        (("--time", "1:2:3:4"), "not a Slurm time"),
        (("--env", "1BAD=x"), "expected NAME=VALUE"),
        (("--nodes", "0"), "--nodes 0"),
        (("--job-name", "a b"), "--job-name"),
    ],
)
def test_bad_requests_name_the_flag(tmp_path: Path, flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(SubmitError, match=message):
        request_from_args(parse(str(config(tmp_path)), *flags))


def test_disaggregated_needs_a_model(tmp_path: Path) -> None:
    with pytest.raises(SubmitError, match="--sglang-model"):
        request_from_args(
            parse(
                str(config(tmp_path)),
                "--mode",
                "disaggregated",
                "--nodes",
                "2",
                "--rollout-nodes",
                "1",
            )
        )


def test_dry_run_prints_and_submits_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch reachable
    logs = tmp_path / "logs"
    rc = run_submit(
        parse(str(config(tmp_path)), "--nodes", "2", "--dry-run", "--log-dir", str(logs))
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("#!/bin/bash\n#SBATCH --job-name=archer-demo\n#SBATCH --nodes=2\n")
    assert not logs.exists()


def test_config_errors_are_reported_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = run_submit(parse(str(config(tmp_path)), "-o", "train.nope=1", "--dry-run"))
    assert rc == 2
    assert "train.nope" in capsys.readouterr().err


def test_missing_sbatch_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("sbatch") is None
    rc = run_submit(parse(str(config(tmp_path)), "--log-dir", str(tmp_path / "logs")))
    assert rc == 127
    assert "sbatch not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("30:15", 1815),
        ("4:00:00", 14400),
        ("1-12", 129600),
        ("1-12:30", 131400),
        ("2-00:30:05", 174605),
        ("UNLIMITED", None),
        ("infinite", None),
    ],
)
def test_slurm_time_seconds(text: str, seconds: int | None) -> None:
    # hand-computed: d-h:m:s = d*86400 + h*3600 + m*60 + s; a bare number is minutes
    assert slurm_time_seconds(text) == seconds


def test_sglang_server_settings_reach_the_job(tmp_path: Path) -> None:
    # rollout.sglang.{router_policy, dtype, mem_fraction_static} become the variables
    # slurm/archer_job.sh passes to sglang-router and the servers (defaults otherwise).
    cfg = config(
        tmp_path,
        "model:\n  path: /m\nrollout:\n  engine: sglang\n  mode: disaggregated\n"
        "  sglang:\n    router_policy: round_robin\n    dtype: float16\n"
        "    mem_fraction_static: 0.65\n",
    )
    req = request_from_args(
        parse(str(cfg), "--nodes", "2", "--mode", "disaggregated", "--rollout-nodes", "1")
    )
    env = exported(render_script(req))
    assert env["ARCHER_ROUTER_POLICY"] == "round_robin"
    assert env["ARCHER_SGLANG_DTYPE"] == "float16"
    assert env["ARCHER_SGLANG_MEM_FRACTION"] == "0.65"
    default = request_from_args(
        parse(
            str(config(tmp_path, "model:\n  path: /m\n")),
            "--nodes",
            "2",
            "--mode",
            "disaggregated",
            "--rollout-nodes",
            "1",
        )
    )
    env = exported(render_script(default))
    assert (env["ARCHER_ROUTER_POLICY"], env["ARCHER_SGLANG_DTYPE"]) == ("cache_aware", "bfloat16")
    assert env["ARCHER_SGLANG_MEM_FRACTION"] == "0.8"


# ------------------------------------------------------------------- the signal lead
PRESET_32B = Path(__file__).resolve().parents[2] / "configs" / "qwen3_32b_archer.yaml"


def _plan_lead(*overrides: str) -> int:
    """The lead plan/stop.py derives for the 32B preset, computed here from its parts."""
    from archer_mcore.config import load_config
    from archer_mcore.plan.search import plan_config
    from archer_mcore.plan.stop import MARGIN_FACTOR, MARGIN_S, checkpoint_bytes

    cfg = load_config(PRESET_32B, list(overrides))
    plan = plan_config(cfg, PRESET_32B)
    save_s = checkpoint_bytes(plan.model) / (cfg.checkpoint.write_gb_per_s * 1e9)
    longest = max(plan.time.rollout_s, plan.time.training_s)
    return math.ceil(MARGIN_FACTOR * (longest + save_s) + MARGIN_S)


def _lead_of(script: str) -> int:
    (line,) = [h for h in header(script) if h.startswith("--signal=")]
    return int(line.rsplit("@", 1)[1])


def test_signal_lead_is_derived_from_the_plan_and_the_write_bandwidth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 14 bytes per parameter (bf16 weights, fp32 master weights, two Adam moments):
    # about 460 GB for Qwen3-32B, 230 s at the default 2 GB/s
    req = request_from_args(parse(str(PRESET_32B), "--log-dir", str(tmp_path)))
    lead = _lead_of(render_script(req))
    assert lead == _plan_lead() and 1800 < lead < 7200  # an hour-long step, not 600 s
    note = capsys.readouterr().err
    assert f"signal lead {lead} s = 1.25 x (" in note and "to write the checkpoint" in note
    # checkpoint.write_gb_per_s: a slower file system needs a longer lead
    slow = request_from_args(
        parse(str(PRESET_32B), "-o", "checkpoint.write_gb_per_s=0.5", "--log-dir", str(tmp_path))
    )
    slow_lead = _lead_of(render_script(slow))
    assert slow_lead == _plan_lead("checkpoint.write_gb_per_s=0.5")
    # 460 GB at 0.5 instead of 2 GB/s: 3 x 230 s more write time, x 1.25
    assert 800 < slow_lead - lead < 900


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (("--signal-lead", "600"), "--signal-lead"),
        (("-o", "slurm.signal_lead_s=600"), "slurm.signal_lead_s"),
    ],
)
def test_a_configured_lead_shorter_than_the_plan_is_used_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: tuple[str, ...], key: str
) -> None:
    req = request_from_args(parse(str(PRESET_32B), *flags, "--log-dir", str(tmp_path)))
    assert _lead_of(render_script(req)) == 600
    err = capsys.readouterr().err
    assert f"warning: {key} = 600 s is shorter than the {_plan_lead()} s" in err, err
    # long enough: no warning
    request_from_args(
        parse(str(PRESET_32B), flags[0], flags[1].replace("600", "9000"), "--log-dir",
              str(tmp_path))
    )  # fmt: skip
    assert "warning" not in capsys.readouterr().err


def test_signal_lead_without_a_plan_falls_back_to_600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a CPU job: the planner sizes GPU jobs only
    req = request_from_args(parse(str(config(tmp_path)), "--gpus-per-node", "0"))
    assert _lead_of(render_script(req)) == 600
    assert "signal lead 600 s (no plan for this job: slurm.gpus_per_node" in capsys.readouterr().err


def test_a_derived_lead_longer_than_the_time_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SubmitError, match=r"derived from the plan.*not shorter than the time"):
        request_from_args(parse(str(PRESET_32B), "--time", "40"))  # 2400 s
