"""Benchmark evaluation recipes (configs/eval/*.yaml, `archer eval --recipe`): every
shipped recipe loads with the settings docs/eval.md cites, bad recipes fail naming the
key and the file, and a recipe's settings reach `archer eval`'s sampling and output
(explicit flags winning)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from archer_mcore.config import ConfigError, load_config
from archer_mcore.train.eval_recipes import (
    RECIPE_DIR,
    RECIPE_KEYS,
    EvalRecipe,
    apply_recipe,
    available_recipes,
    load_recipe,
)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo_cpu.yaml"

# The k and sampling settings of the Archer paper's evaluation (docs/eval.md gives the
# source of each): temperature 0.8, top-p 1.0, 32k response tokens, 2k prompt tokens.
PAPER_K = {"aime2024": 64, "aime2025": 64, "math500": 4, "livecodebench": 8, "livecodebench_v6": 16}


def test_the_shipped_recipes_are_the_documented_ones():
    assert RECIPE_DIR == REPO / "configs" / "eval"
    assert available_recipes() == sorted(PAPER_K)


@pytest.mark.parametrize("name", sorted(PAPER_K))
def test_each_shipped_recipe_loads_with_the_papers_settings(name):
    r = load_recipe(name)
    assert r.name == name and r.source == str(RECIPE_DIR / f"{name}.yaml")
    assert r.n_samples == PAPER_K[name]
    assert (r.temperature, r.top_p, r.max_new_tokens, r.max_prompt_length) == (
        0.8,
        1.0,
        32768,
        2048,
    )
    assert r.metrics == ("avg", "pass")
    assert r.metric_names(r.n_samples) == [f"avg@{r.n_samples}", f"pass@{r.n_samples}"]
    assert r.data_source and r.data_file and r.description
    # Loading by path gives the same recipe.
    assert load_recipe(str(RECIPE_DIR / f"{name}.yaml")) == r
    # Every data source a recipe names is routed to a reward (math or code).
    from archer_mcore.rewards.registry import default_registry

    kind = default_registry().kind_for(r.data_source)
    assert kind is not None and kind.name in ("math", "code")


def test_every_recipe_field_has_a_docstring():
    import ast
    import inspect
    import itertools

    import archer_mcore.train.eval_recipes as mod

    tree = ast.parse(inspect.getsource(mod.EvalRecipe))
    body = tree.body[0].body
    documented = {
        stmt.target.id
        for stmt, nxt in itertools.pairwise(body)
        if isinstance(stmt, ast.AnnAssign)
        and isinstance(nxt, ast.Expr)
        and isinstance(nxt.value, ast.Constant)
        and isinstance(nxt.value.value, str)
    }
    assert set(RECIPE_KEYS) | {"source"} <= documented


def _write(tmp_path: Path, text: str, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_an_unknown_key_names_the_key_and_the_file(tmp_path):
    path = _write(tmp_path, "n_samples: 4\ntemprature: 0.6\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(str(path))
    msg = str(err.value)
    assert "temprature" in msg and str(path) in msg and "temperature" in msg  # allowed keys


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("n_samples: 0", "n_samples"),
        ("n_samples: 2.5", "n_samples"),
        ("n_samples: true", "n_samples"),
        ("temperature: -0.1", "temperature"),
        ("temperature: hot", "temperature"),
        ("top_p: 0", "top_p"),
        ("top_p: 1.5", "top_p"),
        ("max_new_tokens: 0", "max_new_tokens"),
        ("chunk_prompts: -1", "chunk_prompts"),
        ("metrics: [avg, maj]", "metrics"),
        ("metrics: []", "metrics"),
        ("data_source: 3", "data_source"),
        ("name: ''", "name"),
    ],
)
def test_a_bad_value_names_the_key_and_the_file(tmp_path, text, key):
    path = _write(tmp_path, text + "\n")
    with pytest.raises(ConfigError, match=re.escape(key)) as err:
        load_recipe(str(path))
    assert str(path) in str(err.value)


def test_a_recipe_that_is_not_a_mapping_or_not_yaml_is_refused(tmp_path):
    for text in ("- 1\n- 2\n", "n_samples: [1\n"):
        path = _write(tmp_path, text)
        with pytest.raises(ConfigError, match=re.escape(str(path))):
            load_recipe(str(path))


def test_an_unknown_recipe_name_lists_the_available_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_recipe("aime2023")
    msg = str(err.value)
    assert "aime2023" in msg
    for name in PAPER_K:
        assert name in msg
    with pytest.raises(ConfigError, match="is not a file"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_a_recipe_sets_eval_settings_and_explicit_overrides_win():
    recipe = EvalRecipe(
        name="t", n_samples=5, temperature=0.3, top_p=0.7, max_new_tokens=77, max_prompt_length=99
    )
    overrides = ["eval.top_p=0.5", "data.max_prompt_length=50"]
    cfg = load_config(str(DEMO), overrides)
    applied = apply_recipe(cfg, recipe, overrides)
    e = cfg.eval
    assert (e.n_samples, e.temperature, e.max_new_tokens) == (5, 0.3, 77)
    assert e.top_p == 0.5 and cfg.data.max_prompt_length == 50  # the explicit -o wins
    assert applied == {"eval.n_samples": 5, "eval.temperature": 0.3, "eval.max_new_tokens": 77}
    # max_prompt_length 0: the config's is kept.
    cfg = load_config(str(DEMO), [])
    before = cfg.data.max_prompt_length
    apply_recipe(cfg, EvalRecipe(name="t"), [])
    assert cfg.data.max_prompt_length == before


def test_archer_eval_refuses_an_unknown_recipe_before_loading_anything(archer, tmp_path):
    proc = archer.run(
        "eval",
        [],
        "--checkpoint",
        str(tmp_path / "none"),
        "--data",
        str(tmp_path / "none.jsonl"),
        "--recipe",
        "aime2023",
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "no recipe named 'aime2023'" in proc.stderr
    assert "aime2024, aime2025, livecodebench, livecodebench_v6, math500" in proc.stderr


def _eval_file(cache: Path) -> Path:
    """The held-out file the reference run evaluated on (its synthetic-data cache)."""
    files = sorted(cache.glob("synthetic-*-512-*/eval.jsonl"))
    assert len(files) == 1, files
    return files[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_recipes_settings_reach_the_sampling_and_the_outputs(
    archer, helpers, reference_run, tmp_path
):
    # A small recipe: greedy decoding (temperature 0), 3 samples per prompt, 5 prompts
    # per generate call. Greedy samples of a prompt are all equal, so each prompt's 3
    # verdicts agree and pass@3 == avg@3: the recipe's temperature reached the sampler
    # (the demo config's eval.temperature is 1.0: different samples).
    recipe = _write(
        tmp_path,
        "name: tiny\n"
        "description: greedy test recipe\n"
        "data_source: synthetic_arithmetic\n"
        "data_file: eval.jsonl\n"
        "n_samples: 3\n"
        "temperature: 0.0\n"
        "top_p: 0.9\n"
        "max_new_tokens: 12\n"
        "metrics: [avg, pass]\n"
        "chunk_prompts: 5\n",
        name="tiny.yaml",
    )
    data = str(_eval_file(archer.cache))
    ckpt = str(reference_run / "checkpoints")
    out = tmp_path / "eval.json"
    proc = archer.run(
        "eval",
        list(helpers.REFERENCE),
        "--checkpoint",
        ckpt,
        "--data",
        data,
        "--recipe",
        str(recipe),
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["recipe"]["name"] == "tiny" and got["recipe"]["file"] == str(recipe)
    assert got["recipe"]["n_samples"] == 3 and got["recipe"]["temperature"] == 0.0
    s = got["settings"]
    assert (s["n_samples"], s["temperature"], s["top_p"], s["max_new_tokens"]) == (3, 0.0, 0.9, 12)
    res = got["results"]
    assert res["all"]["prompts"] == 16 and res["all"]["samples_per_prompt"] == 3
    assert res["all"]["pass@3"] == pytest.approx(res["all"]["avg@3"])  # greedy
    assert 1 <= got["lengths"]["all"]["max_response_tokens"] <= 12  # the recipe's limit
    assert got["reported"] == {
        "source": "synthetic_arithmetic",
        "avg@3": res["synthetic_arithmetic"]["avg@3"],
        "pass@3": res["synthetic_arithmetic"]["pass@3"],
    }
    # Progress: one line per generate call of 5 prompts (16 prompts: 4 calls).
    progress = re.findall(r"eval: (\d+)/16 prompts", proc.stderr)
    assert progress == ["5", "10", "15", "16"], proc.stderr[-3000:]
    # The markdown table beside the JSON, with the JSON's numbers.
    md = (tmp_path / "eval.md").read_text()
    assert "# Evaluation: tiny" in md and "temperature=0.0" in md
    assert f"{res['all']['avg@3']:.4f}" in md
    assert "| avg@3 | pass@3 |" in md
    assert "cut at max_new_tokens" in md

    # Explicit flags win over the recipe: --samples, -o eval.temperature and
    # -o eval.max_new_tokens.
    out2 = tmp_path / "eval2.json"
    proc = archer.run(
        "eval",
        [*helpers.REFERENCE, "eval.temperature=1.0", "eval.max_new_tokens=4"],
        "--checkpoint",
        ckpt,
        "--data",
        data,
        "--recipe",
        str(recipe),
        "--samples",
        "2",
        "--chunk-prompts",
        "0",
        "--out",
        str(out2),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out2.read_text())
    assert got["settings"]["n_samples"] == 2 and got["settings"]["temperature"] == 1.0
    assert got["settings"]["top_p"] == 0.9  # still the recipe's
    assert got["settings"]["max_new_tokens"] == 4
    assert got["lengths"]["all"]["max_response_tokens"] <= 4
    assert got["results"]["all"]["samples_per_prompt"] == 2
    assert set(got["reported"]) == {"source", "avg@2", "pass@2"}
    assert not re.search(r"eval: \d+/16 prompts", proc.stderr)  # one call, no chunks
