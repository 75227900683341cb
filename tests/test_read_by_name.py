"""Call sites read by name (issue 25 item 4), checked by scanning archer_mcore with `ast`
(nothing is imported):

- no function or method takes more than five parameters positionally (`self` and
  `cls` not counted, as ruff's PLR0917); the later ones go after a `*`, so every call
  names them. The `forward` of a `torch.autograd.Function` is exempt: `Function.apply`
  passes its arguments on by position only (it takes no keyword arguments);
- no dataclass with more than three fields takes more than three of them positionally:
  `@dataclass(kw_only=True)` (or fields after a `KW_ONLY` marker, or `field(kw_only=True)`).

What stays positional is listed below, each entry with its reason.
The lists can only shrink: an entry that no longer breaks the rule fails the test until
it is removed, so a fixed def or dataclass cannot become positional again unnoticed.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "archer_mcore"
MAX_POSITIONAL_PARAMS = 5
MAX_POSITIONAL_FIELDS = 3

# (file under archer_mcore/, qualified name): defs with more than five positional
# parameters that stay so, each with the reason.
PENDING_DEFS: set[tuple[str, str]] = {
    # pickle's REDUCE calls it with the positional tuple `_Pickler.reducer_override` writes
    ("parallel/batch_transport.py", "receive.<locals>.rebuild"),
}

# (file under archer_mcore/, class): dataclasses with more than three positional fields.
PENDING_DATACLASSES: set[tuple[str, str]] = set()


def _sources() -> list[tuple[str, ast.Module]]:
    return [
        (str(p.relative_to(PACKAGE)), ast.parse(p.read_text(), filename=str(p)))
        for p in sorted(PACKAGE.rglob("*.py"))
    ]


def _walk(node: ast.AST, prefix: str = ""):
    """(qualified name, node) of every def and class below `node`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{child.name}"
            yield name, child
            inner = f"{name}." if isinstance(child, ast.ClassDef) else f"{name}.<locals>."
            yield from _walk(child, inner)
        else:
            yield from _walk(child, prefix)


def positional_params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Parameters that may be passed by position, `self` / `cls` not counted."""
    params = [*fn.args.posonlyargs, *fn.args.args]
    if params and params[0].arg in ("self", "cls"):
        params = params[1:]
    return len(params)


def _decorator_name(d: ast.expr) -> str:
    target = d.func if isinstance(d, ast.Call) else d
    return ast.unparse(target).rpartition(".")[2]


def _keyword(call: ast.expr, name: str) -> bool:
    return isinstance(call, ast.Call) and any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def positional_fields(cls: ast.ClassDef) -> int | None:
    """Fields the dataclass `cls` takes positionally; None when it is no dataclass."""
    decorators = [d for d in cls.decorator_list if _decorator_name(d) == "dataclass"]
    if not decorators:
        return None
    if _keyword(decorators[0], "kw_only"):
        return 0
    count = 0
    for stmt in cls.body:
        if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
            continue
        annotation = ast.unparse(stmt.annotation)
        if annotation.rpartition(".")[2] == "KW_ONLY":
            break  # every field after the marker is keyword-only
        if "ClassVar" in annotation:
            continue
        if _keyword(stmt.value, "kw_only") if stmt.value is not None else False:
            continue
        if isinstance(stmt.value, ast.Call) and any(
            k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
            for k in stmt.value.keywords
        ):
            continue
        count += 1
    return count


def apply_only(tree: ast.AST) -> set[str]:
    """Qualified names of the `forward` of each `torch.autograd.Function` subclass:
    `Function.apply` takes positional arguments only, so these stay positional."""
    return {
        f"{name}.forward"
        for name, node in _walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(ast.unparse(b).rpartition(".")[2] == "Function" for b in node.bases)
    }


def _violations() -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    defs: dict[tuple[str, str], int] = {}
    classes: dict[tuple[str, str], int] = {}
    for rel, tree in _sources():
        exempt = apply_only(tree)
        for name, node in _walk(tree):
            if isinstance(node, ast.ClassDef):
                n = positional_fields(node)
                if n is not None and n > MAX_POSITIONAL_FIELDS:
                    classes[(rel, name)] = n
            elif name not in exempt and positional_params(node) > MAX_POSITIONAL_PARAMS:
                defs[(rel, name)] = positional_params(node)
    return defs, classes


def test_defs_take_at_most_five_positional_parameters() -> None:
    defs, _ = _violations()
    new = {k: v for k, v in defs.items() if k not in PENDING_DEFS}
    assert not new, (
        "these defs take more than five parameters positionally; put the later ones "
        f"after a `*` and pass them by name at every call: {sorted(new.items())}"
    )


def test_dataclasses_with_more_than_three_fields_are_keyword_only() -> None:
    _, classes = _violations()
    new = {k: v for k, v in classes.items() if k not in PENDING_DATACLASSES}
    assert not new, (
        "these dataclasses take more than three fields positionally; make them "
        f"@dataclass(kw_only=True) and construct them by name: {sorted(new.items())}"
    )


def test_pending_lists_only_shrink() -> None:
    defs, classes = _violations()
    fixed = sorted((PENDING_DEFS - defs.keys()) | (PENDING_DATACLASSES - classes.keys()))
    assert not fixed, (
        f"no longer positional (or gone): remove from this file's pending lists: {fixed}"
    )


def test_the_scan_counts_as_the_rules_say() -> None:
    tree = ast.parse(
        "from dataclasses import KW_ONLY, dataclass, field\n"
        "class C:\n"
        "    def m(self, a, b, c, d, e, *, f): ...\n"
        "def g(a, b, c, d, e, f=1): ...\n"
        "@dataclass\nclass P:\n    a: int\n    b: int\n    c: int\n    d: int = 0\n"
        "@dataclass(frozen=True, kw_only=True)\nclass K:\n    a: int\n    b: int\n"
        "    c: int\n    d: int\n"
        "@dataclass\nclass M:\n    a: int\n    _: KW_ONLY\n    b: int\n    c: int\n    d: int\n"
        "@dataclass\nclass F:\n    a: int\n    b: int\n    c: int\n"
        "    d: int = field(default=0, kw_only=True)\n"
        "class A(torch.autograd.Function):\n"
        "    @staticmethod\n"
        "    def forward(ctx, a, b, c, d, e, f): ...\n"
    )
    found = dict(_walk(tree))
    assert apply_only(tree) == {"A.forward"}
    assert positional_params(found["C.m"]) == 5
    assert positional_params(found["g"]) == 6
    assert [positional_fields(found[c]) for c in ("P", "K", "M", "F")] == [4, 0, 1, 3]
