"""Every preset loads, has the paper's settings, and fits its named cluster; the
`archer plan` entry points report, fail clearly and suggest a layout that fits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from archer_mcore.cli.plan import add_args as add_plan_args
from archer_mcore.cli.plan import run as run_plan
from archer_mcore.config import load_config
from archer_mcore.plan import GIB, plan_config, shape_from_config, total_params

ROOT = Path(__file__).resolve().parents[2]
MOE = [ROOT / "configs" / f"{s}.yaml" for s in
       ("qwen3_30b_a3b_archer", "qwen3_30b_a3b_dapo", "qwen3_235b_a22b_archer")]  # fmt: skip
QWEN3 = sorted(p for p in (ROOT / "configs").glob("qwen3_*.yaml") if p not in MOE)
PRESETS = [ROOT / "configs" / "r1_distill_1p5b_archer.yaml", *QWEN3, *MOE]


def test_all_nine_qwen3_presets_exist():
    names = {p.stem for p in QWEN3}
    assert names == {
        f"qwen3_{s}_{a}" for s in ("8b", "14b", "32b") for a in ("dapo", "forking", "archer")
    }


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_fits_its_named_cluster(path):
    cfg = load_config(path)
    assert cfg.slurm.gpus_per_node == 8 and cfg.slurm.gpu_type == "h800"
    plan = plan_config(cfg, path)
    assert plan.fits, plan.problems
    # the layout uses the whole cluster: training nodes + rollout nodes
    assert plan.train.gpus + cfg.rollout.sglang.num_servers * cfg.rollout.sglang.tp_size == (
        cfg.slurm.nodes * 8
    )
    assert plan.training.peak.total < 0.92 * 81559 * 2**20


def test_moe_presets_exist_with_the_public_sizes():
    """Qwen3-30B-A3B: 30.5 B parameters, 3.3 B activated; Qwen3-235B-A22B: 235 B, 22 B
    (the model cards); the expert parallel size of each preset divides the experts."""
    from archer_mcore.plan.formulas import active_params

    assert all(p.is_file() for p in MOE)
    sizes = {}
    for path in MOE:
        cfg = load_config(path)
        m = shape_from_config(cfg, path)
        assert m.num_experts % cfg.parallel.expert_model_parallel_size == 0
        assert cfg.parallel.expert_model_parallel_size == 8
        sizes[path.stem] = (round(total_params(m) / 1e9, 2), round(active_params(m) / 1e9, 2))
    assert sizes == {
        "qwen3_30b_a3b_archer": (30.53, 3.35),
        "qwen3_30b_a3b_dapo": (30.53, 3.35),
        "qwen3_235b_a22b_archer": (235.09, 22.19),
    }


@pytest.mark.parametrize("path", QWEN3 + MOE, ids=lambda p: p.stem)
def test_qwen3_presets_follow_dapo_recipe(path):
    cfg = load_config(path)
    assert (cfg.train.prompts_per_step, cfg.rollout.n_samples_per_prompt) == (512, 16)
    assert cfg.train.mini_batch_prompts == 32 and cfg.optimizer.lr == 1e-6
    assert cfg.rollout.max_new_tokens == 20480 and cfg.rollout.temperature == 1.0
    a = cfg.algorithm
    assert (a.overlong_max_length, a.overlong_cache_length) == (20480, 4096)
    algo = path.stem.split("_")[-1]
    assert a.name == {"dapo": "dapo", "forking": "forking", "archer": "archer_math"}[algo]
    assert a.token_rule.name == {"dapo": "none", "forking": "forking", "archer": "archer"}[algo]


def test_archer_preset_follows_the_paper():
    cfg = load_config(PRESETS[0])
    assert (cfg.train.prompts_per_step, cfg.rollout.n_samples_per_prompt) == (64, 16)
    assert (cfg.train.mini_batch_prompts, cfg.train.ppo_epochs) == (32, 3)
    assert cfg.optimizer.lr == 1e-6 and cfg.rollout.temperature == 1.0
    assert cfg.rollout.max_new_tokens == 32768
    assert cfg.algorithm.name in ("archer_math", "archer")


@pytest.mark.parametrize(
    ("stem", "billions"),
    # public sizes: R1-Distill-Qwen-1.5B 1.78 B, Qwen3-8B 8.19 B, 14B 14.77 B, 32B 32.76 B
    [
        ("r1_distill_1p5b_archer", 1.777),
        ("qwen3_8b_dapo", 8.191),
        ("qwen3_14b_dapo", 14.768),
        ("qwen3_32b_dapo", 32.762),
    ],
)
def test_hand_written_hf_configs_have_the_public_sizes(stem, billions):
    path = ROOT / "configs" / f"{stem}.yaml"
    m = shape_from_config(load_config(path), path)
    assert total_params(m) / 1e9 == pytest.approx(billions, abs=1e-3)


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_plan_args(p)
    return p.parse_args(argv)


def test_run_plan_reports_a_fitting_preset(capsys):
    rc = run_plan(_args([str(ROOT / "configs" / "qwen3_8b_dapo.yaml")]))
    out = capsys.readouterr().out
    assert rc == 0
    for word in (
        "weights (bf16)",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "KV pool",
        "estimated step",
        "rollout",
        "fits: yes",
    ):
        assert word in out


def test_run_plan_explains_a_misfit_and_suggests_a_layout(capsys):
    path = ROOT / "configs" / "qwen3_32b_dapo.yaml"
    base = ["parallel.tensor_model_parallel_size=1", "model.recompute=none"]
    rc = run_plan(_args([str(path), "-o", base[0], "-o", base[1]]))
    err = capsys.readouterr().err
    assert rc == 1
    assert "DOES NOT FIT" in err and "training needs" in err
    assert "nearest layout that fits: " in err
    suggestion = err.split("nearest layout that fits: ")[1].splitlines()[0]
    # apply the suggestion: the result must fit
    overrides = [s for s in suggestion.split(", ") if "=" in s]
    assert overrides
    plan = plan_config(load_config(path, [*base, *overrides]), path)
    assert plan.fits, (suggestion, plan.problems)


def test_run_plan_json_and_too_short_micro_batch(capsys):
    path = ROOT / "configs" / "qwen3_8b_forking.yaml"
    rc = run_plan(_args([str(path), "--json", "-o", "parallel.micro_batch_tokens=8192"]))
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and not out["fits"]
    assert any("parallel.micro_batch_tokens = 8192" in p for p in out["problems"])
    assert out["suggestion"] and any("micro_batch_tokens" in s for s in out["suggestion"])


def test_more_memory_per_gpu_fits_a_smaller_layout():
    path = ROOT / "configs" / "qwen3_14b_dapo.yaml"
    cfg = load_config(path, ["model.recompute=none", "parallel.micro_batch_tokens=49152"])
    assert not plan_config(cfg, path, gpu="h800").fits
    h200 = plan_config(cfg, path, gpu="h200")
    assert h200.cluster.spec.memory_bytes > 140 * GIB
    assert h200.training.peak.total > 73 * GIB  # the same bytes, on a bigger GPU
    assert h200.fits, h200.problems


def test_run_plan_rejects_a_cpu_config(capsys, tmp_path):
    p = tmp_path / "cpu.yaml"
    p.write_text("slurm:\n  gpu_type: cpu\n")
    assert run_plan(_args([str(p)])) == 2
    assert "--gpu" in capsys.readouterr().err


def test_bad_tensor_parallel_size_names_the_key():
    path = ROOT / "configs" / "r1_distill_1p5b_archer.yaml"
    plan = plan_config(load_config(path, ["parallel.tensor_model_parallel_size=4"]), path)
    assert any("parallel.tensor_model_parallel_size = 4" in p for p in plan.problems)


def test_local_engine_and_fp8_are_noted(tmp_path):
    p = tmp_path / "demo.yaml"
    p.write_text("model:\n  transformer_impl: transformer_engine\n  fp8: delayed\n")
    plan = plan_config(load_config(p), p)
    assert plan.fits
    assert any("rollout.engine = local" in n for n in plan.notes)
    assert any("model.fp8" in n for n in plan.notes)
