"""Concurrent start-up (issue 14, item 3): runs started together share the synthetic
tokenizer cache; every start builds it and loads it. On main each start rewrote the
files in place, so a concurrent load could read a truncated tokenizer.json
(JSONDecodeError; 499 of 2049 loads failed in the report). Now each file is written
once, to a temp name, then renamed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from archer_mcore.data.arithmetic_tokenizer import build_arithmetic_tokenizer, write_once

# Each worker builds the cache and loads it, over and over; prints "<loads> <errors>"
# and the first error.
WORKER = r"""
import sys
from archer_mcore.data.arithmetic_tokenizer import build_arithmetic_tokenizer
from transformers import AutoTokenizer

cache, n = sys.argv[1], int(sys.argv[2])
errors, first = 0, ""
for i in range(n):
    try:
        build_arithmetic_tokenizer(cache)
        tok = AutoTokenizer.from_pretrained(cache)
        assert tok("Compute 1+2", add_special_tokens=False)["input_ids"]
    except Exception as exc:
        errors += 1
        first = first or f"{type(exc).__name__}: {exc}"[:300]
print(n, errors, first.replace("\n", " "), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_concurrent_builds_and_loads_never_see_a_partial_file(tmp_path: Path) -> None:
    cache = tmp_path / "tokenizer"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(cache), "150"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=280)
        assert p.returncode == 0, err[-3000:]
        loads, errors, *first = out.split(maxsplit=2)
        results.append((int(loads), int(errors), first[0] if first else ""))
    assert sum(r[0] for r in results) == 600
    assert [r[1] for r in results] == [0, 0, 0, 0], results
    # no temp file is left behind
    assert sorted(p.name for p in cache.iterdir()) == [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_write_once_writes_only_when_the_content_differs(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    write_once(path, "one")
    first = path.stat()
    write_once(path, "one")  # same content: the file (inode, mtime) is left alone
    again = path.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    write_once(path, "two")  # new content arrives by rename: a new inode
    assert path.read_text() == "two" and path.stat().st_ino != first.st_ino
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_the_cached_tokenizer_is_unchanged_by_a_second_build(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    build_arithmetic_tokenizer(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    build_arithmetic_tokenizer(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.decode(tok("Compute 12+3", add_special_tokens=False)["input_ids"]) == "Compute 12+3"
