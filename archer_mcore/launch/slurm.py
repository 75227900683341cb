"""Slurm jobs: the sbatch script a run needs, rendered and submitted (`archer submit`;
its command line is `archer_mcore.cli.submit`).

The scripts live in slurm/: train.sbatch, colocated.sbatch, disaggregated.sbatch, each
a header of #SBATCH defaults around the shared body slurm/archer_job.sh. Rendering
writes one self-contained script: #SBATCH lines from the command line (falling back
to the config's `slurm` section), `export ARCHER_*=...` parameter lines, then the
template's body with archer_job.sh inlined. `submit` saves it under the log directory
(a record of exactly what ran) and passes it to `sbatch`.

The mode, unless given, follows the config: rollout.mode = disaggregated with
slurm.rollout_nodes > 0 -> disaggregated; rollout.engine = sglang -> colocated;
otherwise train.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODES = ("train", "colocated", "disaggregated")
INCLUDE_MARK = "# archer:include archer_job.sh"


def slurm_dir() -> Path:
    """The slurm/ directory of this checkout (templates and archer_job.sh)."""
    env = os.environ.get("ARCHER_SLURM_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "slurm"


class SubmitError(ValueError):
    """A bad submit request; the message names the flag or config key."""


@dataclass(kw_only=True)
class SubmitRequest:
    """Everything a rendered script depends on (resolved: no None left but optional
    strings, which are empty when unset)."""

    config: Path
    mode: str
    nodes: int
    rollout_nodes: int = 0
    gpus_per_node: int = 8
    nproc_per_node: int = 8
    cpus_per_task: int = 0  # 0: Slurm's default
    partition: str = ""
    account: str = ""
    time: str = "24:00:00"
    job_name: str = "archer"
    log_dir: Path = Path("slurm-logs")
    signal_lead_s: int = 600
    container_image: str = ""
    container_mounts: str = ""
    pushgateway: str = ""
    python: str = sys.executable
    home: Path = Path.cwd()
    entry: str = ""  # empty: the script's default (-m archer_mcore.cli train)
    sglang_model: str = ""
    sglang_tp: int = 1
    sglang_port: int = 30000
    router_port: int = 30100
    router_policy: str = "cache_aware"  # rollout.sglang.router_policy
    sglang_dtype: str = "bfloat16"  # rollout.sglang.dtype
    sglang_mem_fraction: float = 0.8  # rollout.sglang.mem_fraction_static
    overrides: list[str] = field(default_factory=list)
    extra_sbatch: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def choose_mode(cfg: Any) -> str:
    """The script a config needs (see module docstring)."""
    if cfg.rollout.mode == "disaggregated" and cfg.slurm.rollout_nodes > 0:
        return "disaggregated"
    if cfg.rollout.engine == "sglang":
        return "colocated"
    return "train"


_FLAGS = {  # SubmitRequest field -> the flag (and config key) that sets it
    "config": "CONFIG",
    "partition": "--partition (slurm.partition)",
    "account": "--account (slurm.account)",
    "time": "--time (slurm.time)",
    "job_name": "--job-name",
    "log_dir": "--log-dir",
    "container_image": "--container-image (slurm.container_image)",
    "container_mounts": "--container-mounts",
    "pushgateway": "--pushgateway (metrics.pushgateway)",
    "python": "--python",
    "home": "--home",
    "entry": "--entry",
    "sglang_model": "--sglang-model (model.path)",
    "overrides": "--override",
    "extra_sbatch": "--sbatch (slurm.extra_sbatch)",
    "env": "--env",
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_no_control_chars(req: SubmitRequest) -> None:
    """Every text that goes into the script must be one line of printable text: a
    newline in, say, --partition would end the #SBATCH line and start another."""
    for f in dataclasses.fields(req):
        value = getattr(req, f.name)
        texts: list[str]
        if isinstance(value, dict):
            texts = [f"{k}={v}" for k, v in value.items()]
        elif isinstance(value, list):
            texts = [str(v) for v in value]
        elif isinstance(value, (str, Path)):
            texts = [str(value)]
        else:
            continue
        for text in texts:
            m = _CONTROL.search(text)
            if m:
                flag = _FLAGS.get(f.name, f.name)
                raise SubmitError(
                    f"{flag} {text!r}: contains the control character {m.group()!r}; "
                    "values must be single lines of printable text"
                )


def validate(req: SubmitRequest) -> None:
    _check_no_control_chars(req)
    for value, flag in (
        (req.gpus_per_node, "--gpus-per-node (slurm.gpus_per_node)"),
        (req.rollout_nodes, "--rollout-nodes (slurm.rollout_nodes)"),
        (req.cpus_per_task, "--cpus-per-task"),
    ):
        if value < 0:
            raise SubmitError(f"{flag} {value}: must be >= 0")
    if req.mode not in MODES:
        raise SubmitError(f"mode {req.mode!r}: must be one of {', '.join(MODES)}")
    if req.nodes < 1:
        raise SubmitError(f"--nodes {req.nodes}: must be >= 1")
    if req.nproc_per_node < 1:
        raise SubmitError(f"--nproc-per-node {req.nproc_per_node}: must be >= 1")
    if req.mode == "disaggregated":
        if not 1 <= req.rollout_nodes < req.nodes:
            raise SubmitError(
                f"disaggregated mode: --rollout-nodes (slurm.rollout_nodes) = {req.rollout_nodes} "
                f"must be >= 1 and < --nodes = {req.nodes} (some nodes must train)"
            )
        if not req.sglang_model:
            raise SubmitError("disaggregated mode needs --sglang-model or model.path in the config")
    if req.signal_lead_s < 0:
        raise SubmitError(f"--signal-lead {req.signal_lead_s}: must be >= 0")
    try:
        limit = slurm_time_seconds(req.time)
    except ValueError as exc:
        raise SubmitError(f"--time (slurm.time): {exc}") from None
    if limit is not None and req.signal_lead_s >= limit:
        raise SubmitError(
            f"--signal-lead {req.signal_lead_s} s is not shorter than the time limit "
            f"{req.time} ({limit} s): Slurm would signal the job as soon as it starts"
        )
    if not re.fullmatch(r"[\w.+-]+", req.job_name):
        raise SubmitError(f"--job-name {req.job_name!r}: use letters, digits, . _ + -")


def slurm_time_seconds(text: str) -> int | None:
    """Seconds in a Slurm time limit ("30", "30:00", "4:00:00", "1-12", "2-00:30:00");
    None for "UNLIMITED" / "infinite"; ValueError when malformed."""
    t = text.strip()
    if t.lower() in ("unlimited", "infinite"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise ValueError(f"time limit {text!r} is not a Slurm time (e.g. 30, 4:00:00, 1-12:00:00)")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())

    def limited(value: int | None, bound: int, what: str) -> int:
        if value is not None and value >= bound:
            raise ValueError(f"time limit {text!r}: {value} {what} (must be < {bound})")
        return value or 0

    if days is not None:  # days-hours[:minutes[:seconds]]
        seconds = (
            days * 86400
            + limited(a, 24, "hours") * 3600
            + limited(b, 60, "minutes") * 60
            + limited(c, 60, "seconds")
        )
    elif c is not None:  # hours:minutes:seconds
        seconds = a * 3600 + limited(b, 60, "minutes") * 60 + limited(c, 60, "seconds")
    elif b is not None:  # minutes:seconds
        seconds = a * 60 + limited(b, 60, "seconds")
    else:
        seconds = a * 60  # minutes
    if seconds <= 0:
        raise ValueError(f"time limit {text!r} is zero: the job could not run at all")
    return seconds


# --------------------------------------------------------------------------- render
def sbatch_header(req: SubmitRequest) -> list[str]:
    lines = [
        f"--job-name={req.job_name}",
        f"--nodes={req.nodes}",
        "--ntasks-per-node=1",
    ]
    if req.gpus_per_node > 0:
        lines += [f"--gpus-per-node={req.gpus_per_node}", "--exclusive"]
    if req.cpus_per_task > 0:
        lines.append(f"--cpus-per-task={req.cpus_per_task}")
    if req.partition:
        lines.append(f"--partition={req.partition}")
    if req.account:
        lines.append(f"--account={req.account}")
    lines += [
        f"--time={req.time}",
        "--requeue",
        f"--signal=B:USR1@{req.signal_lead_s}",
        "--open-mode=append",
        f"--output={req.log_dir}/%x-%j.out",
    ]
    for flag in req.extra_sbatch:
        flag = flag.strip().removeprefix("#SBATCH").strip()
        if flag:
            lines.append(flag)
    return ["#SBATCH " + line for line in lines]


def script_env(req: SubmitRequest) -> dict[str, str]:
    env = {
        "ARCHER_MODE": req.mode,
        "ARCHER_CONFIG": str(req.config),
        "ARCHER_HOME": str(req.home),
        "ARCHER_PYTHON": req.python,
        "ARCHER_NPROC_PER_NODE": str(req.nproc_per_node),
        "ARCHER_LOG_DIR": str(req.log_dir),
        "ARCHER_OVERRIDES": "\n".join(req.overrides),
        "ARCHER_CONTAINER_IMAGE": req.container_image,
        "ARCHER_CONTAINER_MOUNTS": req.container_mounts,
        "ARCHER_PUSHGATEWAY": req.pushgateway,
    }
    if req.entry:
        env["ARCHER_ENTRY"] = req.entry
    if req.mode == "disaggregated":
        env |= {
            "ARCHER_ROLLOUT_NODES": str(req.rollout_nodes),
            "ARCHER_SGLANG_MODEL": req.sglang_model,
            "ARCHER_SGLANG_TP": str(req.sglang_tp),
            "ARCHER_SGLANG_PORT": str(req.sglang_port),
            "ARCHER_ROUTER_PORT": str(req.router_port),
            "ARCHER_ROUTER_POLICY": req.router_policy,
            "ARCHER_SGLANG_DTYPE": req.sglang_dtype,
            "ARCHER_SGLANG_MEM_FRACTION": str(req.sglang_mem_fraction),
        }
    return env | req.env


def _template_body(mode: str) -> str:
    """The template's lines after its #SBATCH header, with archer_job.sh inlined."""
    base = slurm_dir()
    lines = (base / f"{mode}.sbatch").read_text().splitlines()
    last_directive = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    body: list[str] = []
    skip_source = False
    for line in lines[last_directive + 1 :]:
        if line.strip() == INCLUDE_MARK:
            body.append(f"# ---- begin slurm/archer_job.sh ({base / 'archer_job.sh'})")
            body += (base / "archer_job.sh").read_text().splitlines()
            body.append("# ---- end slurm/archer_job.sh")
            skip_source = True
            continue
        if skip_source and line.startswith("source "):
            skip_source = False
            continue
        body.append(line)
    return "\n".join(body)


def render_script(req: SubmitRequest, now: _dt.datetime | None = None) -> str:
    """The complete sbatch script for `req`."""
    validate(req)
    stamp = (now or _dt.datetime.now(_dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = ["#!/bin/bash", *sbatch_header(req)]
    out.append(f"# Rendered by `archer submit` from slurm/{req.mode}.sbatch at {stamp}.")
    out.append("# Change parameters on the archer submit command line, not here.")
    for name, value in script_env(req).items():
        out.append(f"export {name}={shlex.quote(value)}")
    out.append(_template_body(req.mode))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- submit
def submit(
    script: str, req: SubmitRequest, test_only: bool = False, sbatch: str = "sbatch"
) -> tuple[int, str]:
    """Write the script under log_dir and run sbatch on it; (exit code, message)."""
    binary = shutil.which(sbatch) or sbatch
    req.log_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    path = req.log_dir / f"{req.job_name}-{stamp}.sbatch"
    path.write_text(script)
    argv = [binary, "--parsable", *(["--test-only"] if test_only else []), str(path)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=req.home, timeout=120)
    except FileNotFoundError:
        return 127, f"archer submit: {sbatch} not found (is Slurm installed here?)"
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        return proc.returncode, f"archer submit: sbatch failed ({proc.returncode}): {text}"
    if test_only:
        return 0, f"archer submit: Slurm accepts {path}: {text}"
    job_id = proc.stdout.strip().split(";")[0]
    return 0, f"Submitted batch job {job_id} ({req.mode}, {req.nodes} node(s)); script {path}"
