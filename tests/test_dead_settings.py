"""A guard against dead settings: every leaf of `Config` must have a reader in the code
that runs (archer_mcore/, except the config/ package, which defines and checks the
fields, and the plan/ package, which only sizes a run).

A field counts as read where the code accesses it on an object known to be its section
(an AST scan; the scanned code is not imported). Sections are followed from the root
`Config` (a parameter annotated `Config`, the result of `load_config`/`config_from_dict`,
a class field annotated `Config` seen as `self.<field>`), so an unrelated object with a
`.model` or `.data` attribute is not taken for a section:

- an attribute chain: ``cfg.rollout.top_p``, ``self.cfg.rollout.sglang.server_urls``;
- a name bound to a section: ``a = cfg.algorithm`` (also in a tuple assignment), a
  parameter annotated with the section's class (``a: AlgorithmConfig``), or a parameter
  of a function that some call passes a section (``RewardScorer.from_config(cfg.rewards)``
  binds ``from_config``'s ``cfg`` to ``rewards``); nested functions see their enclosing
  function's names;
- ``getattr(section, "field")``; ``asdict(section)`` / ``vars(section)`` read every field
  of the section (e.g. the inline architecture becomes the HF config wholesale).

Reads inside a function that no scanned file calls or names do not count (dead code).
Fields read only at load time or by the planner, on purpose, are in `LOAD_OR_PLAN_ONLY`
with the reason.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from collections import defaultdict
from pathlib import Path

from archer_mcore.config import BUILTIN_TOKEN_RULES, Config, TokenRuleConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "archer_mcore"
EXCLUDED = {*(PACKAGE / "config").glob("*.py"), *(PACKAGE / "plan").glob("*.py")}

#: Fields read only at load time (config/) or by the planner (`archer plan`), on
#: purpose, with the reason.
LOAD_OR_PLAN_ONLY: dict[str, str] = {
    "algorithm.name": "selects the recipe at load time (archer_mcore/config/recipes/); its "
    "effect is the recipe's field values, which the loss and loop read (tests/test_config.py)",
    "parallel.context_parallel_size": "sized by the planner; the trainer refuses values > 1 "
    "(config.check_context_parallel, called by build_components: it does not split "
    "micro-batches over CP ranks yet, tests/longctx/test_context_parallel.py)",
    "slurm.gpu_type": "the planner's GPU model (memory, peak FLOP/s); the job runs on the GPUs "
    "Slurm grants, so the trainer has nothing to do with the name",
}


# ------------------------------------------------------------------ the config tree
def _variants(cls: type) -> list[type]:
    """The classes a section of type `cls` may hold: `algorithm.token_rule` is a tagged
    union, each built-in rule's settings class one variant (a leaf read by any of them
    counts)."""
    return [cls, *BUILTIN_TOKEN_RULES.values()] if cls is TokenRuleConfig else [cls]


def _leaves() -> dict[str, tuple[str, str]]:
    """dotted key -> (section name, field name) for every leaf of `Config`."""
    out: dict[str, tuple[str, str]] = {}

    def walk(cls: type, prefix: str, section: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                for variant in _variants(hints[f.name]):
                    walk(variant, f"{prefix}{f.name}.", f.name)
            else:
                out[prefix + f.name] = (section, f.name)

    walk(Config, "", "")
    return out


def _section_classes() -> dict[str, str]:
    """Section class name -> section name (e.g. SGLangConfig -> sglang)."""
    out: dict[str, str] = {}

    def walk(cls: type) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                for variant in _variants(hints[f.name]):
                    out[variant.__name__] = f.name
                    walk(variant)

    walk(Config)
    return out


LEAVES = _leaves()
FIELDS: dict[str, set[str]] = defaultdict(set)
for _section, _name in LEAVES.values():
    FIELDS[_section].add(_name)
SECTIONS = set(FIELDS)
ANNOTATIONS = _section_classes()
ANNOTATIONS["LossConfig"] = "algorithm"  # archer_mcore.algo.losses: the same class


# ------------------------------------------------------------------ the scan
#: The section each section hangs under ("" is the root `Config`).
PARENT: dict[str, str] = {s: "" for s in SECTIONS}
PARENT.update(sglang="rollout", arch="model", synthetic="data", token_rule="algorithm")
ANNOTATIONS["Config"] = ""
# actor/policy_config.py's PolicyConfig embeds the model, parallel, optimizer and kernels sections
# whole, under their own names: for the scan it is a root that holds those sections.
ANNOTATIONS["PolicyConfig"] = ""
ROOT_FACTORIES = ("load_config", "config_from_dict")
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _own_nodes(fn: ast.AST) -> list[ast.AST]:
    """The nodes of `fn`'s body, not descending into nested functions or classes."""
    out, todo = [], list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        out.append(node)
        if not isinstance(node, SCOPES):
            todo.extend(ast.iter_child_nodes(node))
    return out


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _annotation_section(ann: ast.AST | None) -> str | None:
    if ann is None:
        return None
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
        name = ann.value.split(".")[-1].strip()
    elif isinstance(ann, ast.Name):
        name = ann.id
    elif isinstance(ann, ast.Attribute):
        name = ann.attr
    else:
        return None
    return ANNOTATIONS.get(name)


Env = dict[str, set[str]]  # a name (or "self.attr") -> the sections it may hold


class Scan:
    """Reads of (section, field) over the scanned files.

    Sections are followed from the root: `x.rollout` is the rollout section only where
    `x` is a `Config`, so an unrelated object that happens to have a `.model` or `.data`
    attribute is not mistaken for one. A function that no scanned file names (by call or
    reference) is dead code and its reads do not count. Call-site bindings are iterated
    to a fixed point.
    """

    def __init__(self, files: list[Path], root: Path) -> None:
        self.root = root
        self.trees = {p: ast.parse(p.read_text(), str(p)) for p in files}
        self.referenced = {
            n.id if isinstance(n, ast.Name) else n.attr
            for tree in self.trees.values()
            for n in ast.walk(tree)
            if isinstance(n, (ast.Name, ast.Attribute)) and isinstance(n.ctx, ast.Load)
        }
        self.reads: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.passed: set[tuple[str, str | int, str]] = set()  # (function, param, section)

    def run(self) -> None:
        while True:
            before = len(self.passed)
            self.reads.clear()
            for path, tree in self.trees.items():
                self._scope(tree, {}, str(path.relative_to(self.root)))
            if len(self.passed) == before:
                return

    def _section(self, node: ast.AST, env: Env) -> set[str]:
        if isinstance(node, ast.Name):
            return env.get(node.id, set())
        if isinstance(node, ast.Call) and _call_name(node) in ROOT_FACTORIES:
            return {""}
        if isinstance(node, ast.Attribute):
            out = set()
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                out |= env.get(f"self.{node.attr}", set())
            if node.attr in SECTIONS and PARENT[node.attr] in self._section(node.value, env):
                out.add(node.attr)
            return out
        return set()

    def _params(self, fn: ast.AST, env: Env) -> Env:
        env = {k: set(v) for k, v in env.items()}
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return env
        args = fn.args
        positional = [*args.posonlyargs, *args.args]
        if positional and positional[0].arg in ("self", "cls"):
            positional = positional[1:]
        names = {a.arg for a in [*positional, *args.kwonlyargs]}
        for arg in [*positional, *args.kwonlyargs]:
            env.pop(arg.arg, None)
            sec = _annotation_section(arg.annotation)
            if sec is not None:
                env.setdefault(arg.arg, set()).add(sec)
        for name, key, sec in self.passed:
            if name != fn.name:
                continue
            if isinstance(key, int) and key < len(positional):
                env.setdefault(positional[key].arg, set()).add(sec)
            elif isinstance(key, str) and key in names:
                env.setdefault(key, set()).add(sec)
        return env

    def _class_env(self, cls: ast.ClassDef, env: Env) -> Env:
        """`self.<field>` for the class's annotated fields that hold a config section."""
        env = {k: set(v) for k, v in env.items()}
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                sec = _annotation_section(node.annotation)
                if sec is not None:
                    env.setdefault(f"self.{node.target.id}", set()).add(sec)
        return env

    def _bind(self, node: ast.AST, env: Env) -> None:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
            return
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            pairs = (
                zip(target.elts, node.value.elts)
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                else [(target, node.value)]
            )
            for t, v in pairs:
                secs = self._section(v, env)
                if isinstance(t, ast.Name) and secs:
                    env.setdefault(t.id, set()).update(secs)

    def _read(self, node: ast.AST, env: Env, where: str) -> None:
        if isinstance(node, ast.Attribute):
            for sec in self._section(node.value, env) - {""}:
                if node.attr in FIELDS[sec]:
                    self.reads[(sec, node.attr)].add(where)
        if not isinstance(node, ast.Call):
            return
        name = _call_name(node)
        first = self._section(node.args[0], env) - {""} if node.args else set()
        if name in ("asdict", "vars"):
            for sec in first:
                for f in FIELDS[sec]:
                    self.reads[(sec, f)].add(where)
        elif name == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            for sec in first:
                if node.args[1].value in FIELDS[sec]:
                    self.reads[(sec, node.args[1].value)].add(where)
        if name:
            for i, arg in enumerate(node.args):
                for sec in self._section(arg, env):
                    self.passed.add((name, i, sec))
            for kw in node.keywords:
                for sec in self._section(kw.value, env) if kw.arg else ():
                    self.passed.add((name, kw.arg, sec))

    def _scope(self, fn: ast.AST, outer: Env, where: str) -> None:
        is_function = isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        if is_function and fn.name not in self.referenced and not fn.name.startswith("__"):
            return  # nothing calls it: its reads are dead code
        env = (
            self._class_env(fn, outer) if isinstance(fn, ast.ClassDef) else self._params(fn, outer)
        )
        nodes = _own_nodes(fn)
        for node in nodes:  # bindings first, then reads
            self._bind(node, env)
        for node in nodes:
            self._read(node, env, where)
        for node in nodes:
            if isinstance(node, SCOPES):
                self._scope(node, env, where)


def scan(root: Path = PACKAGE, excluded: set[Path] = EXCLUDED) -> Scan:
    s = Scan(sorted(p for p in root.rglob("*.py") if p not in excluded), root)
    s.run()
    return s


def dead_settings() -> list[str]:
    reads = scan().reads
    return [key for key, sec_field in LEAVES.items() if not reads.get(sec_field)]


# ------------------------------------------------------------------ the tests
def test_every_setting_has_a_reader() -> None:
    dead = set(dead_settings())
    allowed = set(LOAD_OR_PLAN_ONLY)
    offenders = sorted(dead - allowed)
    assert not offenders, (
        "config fields that nothing outside config/ / plan/ reads (wire them, or "
        "remove them from config/, configs/*.yaml and the docs):\n  " + "\n  ".join(offenders)
    )


def test_the_allowlists_hold_only_dead_fields() -> None:
    # An allowlisted field that gained a reader must leave the list; unknown keys too.
    dead = set(dead_settings())
    for key in LOAD_OR_PLAN_ONLY:
        assert key in LEAVES, f"{key} is not a config field"
        assert key in dead, f"{key} now has a reader: remove it from the allowlist"
    assert len(LOAD_OR_PLAN_ONLY) <= 4


def test_the_scan_finds_each_kind_of_read(tmp_path: Path) -> None:
    # The scanner itself, on a hand-written module: each form of read is found; an object
    # that is not a Config (however its attributes are named) and a function nothing
    # calls read nothing.
    src = tmp_path / "pkg"
    src.mkdir()
    (src / "m.py").write_text(
        "from dataclasses import asdict\n"
        "def f(cfg: Config, a: AlgorithmConfig):\n"
        "    t, r = cfg.train, cfg.rollout\n"
        "    use(a.clip_low, t.seed, getattr(r, 'top_k'), asdict(cfg.data.synthetic))\n"
        "    build(cfg.rewards)\n"
        "    def inner():\n"
        "        return r.sglang.max_retries + cfg.eval.temperature\n"
        "    return inner\n"
        "def build(rw):\n"
        "    return rw.num_workers\n"
        "def unrelated(policy):\n"
        "    return policy.model.fp8 + policy.cfg.train.log_every\n"
        "def never_called(cfg: Config):\n"
        "    return cfg.kernels.mode\n"
        "class Holder:\n"
        "    cfg: Config\n"
        "    def m(self):\n"
        "        return self.cfg.checkpoint.keep_last\n"
        "f(load_config('x.yaml'), None)\n"
        "unrelated(object())\n"
        "Holder().m()\n"
    )
    found = {f"{s}.{f}" for (s, f) in scan(src, set()).reads}
    expected = {
        "algorithm.clip_low",
        "train.seed",
        "rollout.top_k",
        "rewards.num_workers",
        "sglang.max_retries",
        "eval.temperature",
        "checkpoint.keep_last",
        *(f"synthetic.{f}" for f in FIELDS["synthetic"]),
    }
    assert found == expected
