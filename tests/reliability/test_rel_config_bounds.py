"""Bad config input stays small and linear (issue 22, item 13): whatever a config file or
a `-o` override holds (a YAML alias bomb, a megabyte scalar, a deep nested list, an
unknown key with a huge name), loading it fails fast with a `ConfigError` of a few KB,
and a "billion laughs" document is refused before it is expanded."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from archer_mcore.cli import main
from archer_mcore.config import ConfigError, load_config

#: An error line may be this long at most (the brief's "under a few KB").
LIMIT = 4096
#: Seconds any of these may take (each takes milliseconds when bounded).
FAST = 5.0

HUGE = 1_000_000


def _laughs(levels: int = 9, width: int = 9, key: str = "data.train_files") -> str:
    """The classic "billion laughs" YAML: `width ** levels` strings from ~300 bytes, under
    `key` (dotted: nested mappings)."""
    lines = ['a0: &a0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    *sections, name = key.split(".")
    body = ""
    for depth, part in enumerate(sections):
        body += "  " * depth + f"{part}:\n"
    body += "  " * len(sections) + f"{name}: *a{levels}\n"
    return "\n".join(lines) + "\n" + body


def _bomb_under(key: str, levels: int = 9) -> str:
    """Anchors under a throwaway top-level key (itself an unknown key) would fail before
    the bomb is used; so the anchors sit inside the value: a list whose last item is the
    bomb."""
    inner = ['&a0 "lol"']
    text = "[" + inner[0]
    for i in range(1, levels + 1):
        text += ", &a{} [{}]".format(i, ", ".join([f"*a{i - 1}"] * 9))
    text += "]"
    *sections, name = key.split(".")
    body = ""
    for depth, part in enumerate(sections):
        body += "  " * depth + f"{part}:\n"
    return body + "  " * len(sections) + f"{name}: {text}\n"


def _load_error(path: Path, overrides: tuple[str, ...] = ()) -> str:
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides)
    elapsed = time.monotonic() - t0
    message = str(exc.value)
    assert elapsed < FAST, f"took {elapsed:.1f}s"
    assert len(message) < LIMIT, f"{len(message)} chars: {message[:300]}..."
    return message


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_the_265_byte_alias_bomb_of_the_issue(tmp_path: Path) -> None:
    # Like the issue's document: a key that wants a string gets nested lists of aliases,
    # whose repr was 3.2 MB (9**6 strings); today it fails as an alias expansion.
    text = (
        'model:\n  path: [&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"],\n'
        "    &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b],\n"
        "    &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d],\n"
        "    &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]]\n"
    )
    assert len(text) < 300
    message = _load_error(_write(tmp_path, text))
    assert "c.yaml" in message


@pytest.mark.parametrize(
    "key", ["data.train_files", "rollout.sglang.extra_server_args", "model.path", "train.steps"]
)
def test_billion_laughs_is_refused_before_expansion(tmp_path: Path, key: str) -> None:
    # 9**9 (387 million) strings: expanding it (or its repr) would take minutes and GBs.
    message = _load_error(_write(tmp_path, _bomb_under(key)))
    assert "alias" in message and "c.yaml" in message


def test_billion_laughs_with_top_level_anchors(tmp_path: Path) -> None:
    message = _load_error(_write(tmp_path, _laughs()))
    assert "alias" in message


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    message = _load_error(_write(tmp_path, "data:\n  train_files: &x [*x]\n"))
    assert "alias" in message


def test_small_aliases_still_load(tmp_path: Path) -> None:
    # Anchors and aliases are legitimate YAML; only huge expansions are refused.
    text = (
        "data:\n  train_files: &files [a.jsonl, b.jsonl]\n  eval_files: *files\neval:\n  every: 0\n"
    )
    cfg = load_config(_write(tmp_path, text))
    assert cfg.data.eval_files == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.path", "x" * HUGE),  # a str field: fine, but the error elsewhere must be small
        ("train.steps", "x" * HUGE),  # wrong type: the value is echoed
        ("rollout.engine", "x" * HUGE),  # a Literal: the value is echoed
        ("optimizer.lr", "x" * HUGE),  # float (tries the YAML 1.1 float regex on it)
        ("optimizer.lr", '"' + "1" * 100_000 + '"'),  # the float regex backtracks on digits
        ("rollout.tis_cap", '"' + "1" * 100_000 + '"'),  # float | None
        ("data.default_reward_kind", "x" * HUGE),  # checked in checks.py
    ],
)
def test_a_huge_scalar_gives_a_small_error(tmp_path: Path, key: str, value: str) -> None:
    *sections, name = key.split(".")
    text = "".join("  " * d + f"{p}:\n" for d, p in enumerate(sections))
    text += "  " * len(sections) + f"{name}: {value}\n"
    if key == "model.path":
        text += "train:\n  steps: oops\n"
    _load_error(_write(tmp_path, text))


def test_a_huge_number_gives_a_small_error(tmp_path: Path) -> None:
    # YAML's int() of a 5000-digit number raises a plain ValueError (Python's digit limit).
    _load_error(_write(tmp_path, "train:\n  steps: " + "9" * 5000 + "\n"))
    _load_error(_write(tmp_path, "train:\n  prompts_per_step: " + "9" * 4000 + "\n"))


def test_a_deep_nested_list_under_a_wrong_key(tmp_path: Path) -> None:
    depth = 5000
    text = "data:\n  train_files: " + "[" * depth + "x" + "]" * depth + "\n"
    _load_error(_write(tmp_path, text))
    wide = "[" + ", ".join(["[" + ", ".join(["yy"] * 300) + "]"] * 300) + "]"
    _load_error(_write(tmp_path, f"data:\n  train_files: {wide}\n"))
    _load_error(_write(tmp_path, f"train:\n  steps: {wide}\n"))
    mapping = "{" + ", ".join(f"k{i}: {'v' * 1000}" for i in range(2000)) + "}"
    _load_error(_write(tmp_path, f"train:\n  steps: {mapping}\n"))


def test_an_unknown_key_with_a_huge_name(tmp_path: Path) -> None:
    # PyYAML refuses a plain key over 1024 chars (invalid YAML, echoing the line)...
    _load_error(_write(tmp_path, "train:\n  " + "s" * HUGE + ": 1\n"))
    _load_error(_write(tmp_path, "k" * HUGE + ": 1\n"))
    # ... but takes an explicit one, and a 1000-char plain one: the loader's unknown key.
    message = _load_error(_write(tmp_path, 'train:\n  ? "' + "q" * HUGE + '"\n  : 1\n'))
    assert "unknown key train.qqq" in message
    message = _load_error(_write(tmp_path, "train:\n  " + "stepz" * 200 + ": 1\n"))
    assert "unknown key train.stepz" in message


def test_a_duplicate_huge_key(tmp_path: Path) -> None:
    key = "d" * (HUGE // 4)  # explicit keys: PyYAML takes no implicit key over 1024 chars
    message = _load_error(_write(tmp_path, f'? "{key}"\n: 1\n? "{key}"\n: 2\n'))
    assert "duplicate key 'ddd" in message


@pytest.mark.parametrize(
    "override",
    [
        "train.steps=" + "x" * HUGE,
        "rollout.engine=" + "x" * HUGE,
        "train." + "k" * HUGE + "=1",
        "data.train_files=[" + ",".join(["[a, b]"] * 100_000) + "]",
        "train.steps=[" + "x" * HUGE,  # invalid YAML
        "x" * HUGE,  # no '='
        "train.steps.deeper" + ".x" * 200_000 + "=1",  # a section that is not one
        "rollout.sglang.extra_server_args=[--dp-size, " + "9" * HUGE + "]",
        "data.train_files=" + _bomb_under("k").split(": ", 1)[1].strip(),
    ],
)
def test_a_huge_override_gives_a_small_error(tmp_path: Path, override: str) -> None:
    path = _write(tmp_path, "train:\n  steps: 2\n")
    _load_error(path, (override,))


def test_the_cli_prints_one_short_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path, _bomb_under("data.train_files"))
    t0 = time.monotonic()
    assert main(["config", "show", str(path)]) == 2
    assert time.monotonic() - t0 < FAST
    err = capsys.readouterr().err
    assert len(err) < LIMIT and "alias" in err


def test_clip_is_bounded_and_linear() -> None:
    # The helper itself: a bounded repr of any value, without building the full repr.
    from archer_mcore.config.errors import MAX_VALUE_CHARS, clip

    nested: list = ["lol"] * 9
    for _ in range(12):  # 9**13 strings if expanded
        nested = [nested] * 9
    t0 = time.monotonic()
    for value in (nested, "x" * 10 * HUGE, {"k" * HUGE: "v" * HUGE}, 10**4000, 1.5, None):
        out = clip(value)
        assert len(out) <= MAX_VALUE_CHARS, out
    assert time.monotonic() - t0 < 1.0
    assert clip("short") == "'short'" and clip(3) == "3"
    path = "/data/" + "p" * 200 + ".jsonl"  # a long path is still shown whole
    assert clip(path) == repr(path)
    assert "1000000 chars" in clip("x" * HUGE)


def test_every_config_error_is_bounded() -> None:
    # The backstop: a message built elsewhere from unbounded parts is cut in the middle.
    from archer_mcore.config.errors import MAX_ERROR_CHARS

    message = str(ConfigError("head " + "x" * HUGE + " tail"))
    assert len(message) <= MAX_ERROR_CHARS and message.startswith("head ")
    assert message.endswith(" tail")


def test_a_huge_file_is_not_read_whole(tmp_path: Path) -> None:
    # A 10 GB (sparse) file: refused after reading 1 MiB of it.
    path = tmp_path / "c.yaml"
    with open(path, "wb") as f:
        f.write(b"train:\n  steps: 1\n# ")
        f.truncate(10 << 30)
    message = _load_error(path)
    assert "bytes" in message
