"""Function-call test driver, shipped into the sandbox as main.py (stdlib only).

Usage inside the sandbox: `python main.py NONCE PER_CASE_TIMEOUT_S` with
`solution.py` (the candidate) and `cases.json` (a list of {"fn_name", "args",
"expected"}) beside it. It executes the candidate as a module (its `__main__` block
does not run), finds each case's function (a top-level function, or a method of
`class Solution` as in LeetCode), calls it on a deep copy of the arguments with a
per-case alarm, compares the result with the expected value and prints one line per
case to the original stdout: `NONCE <index> <1|0> <note>`. The candidate's own prints
go to a discarded buffer. Being in the same process, a hostile candidate could forge
these lines; the nonce only guards against accidental matches.
"""

import contextlib
import copy
import io
import json
import math
import signal
import sys


def values_equal(result, expected):
    """Equality after a JSON round trip (tuples become lists), floats to 1e-6."""
    with contextlib.suppress(TypeError, ValueError):
        result = json.loads(json.dumps(result))
    return _equal(result, expected)


def _equal(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (a == b and type(a) is type(b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


class _CaseTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _CaseTimeout()


def _find(namespace, name):
    fn = namespace.get(name)
    if callable(fn):
        return fn
    cls = namespace.get("Solution")
    if cls is not None and hasattr(cls, name):
        return getattr(cls(), name)
    raise NameError(f"no function or Solution method named {name!r}")


def main():
    nonce, per_case_timeout = sys.argv[1], float(sys.argv[2])
    out = sys.stdout
    with open("cases.json") as f:
        cases = json.load(f)
    with open("solution.py") as f:
        source = f.read()
    sys.stdout = io.StringIO()
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException as err:
        sys.stdout = out
        for i in range(len(cases)):
            print(f"{nonce} {i} 0 load-error:{type(err).__name__}", file=out, flush=True)
        return
    signal.signal(signal.SIGALRM, _on_alarm)
    for i, case in enumerate(cases):
        note = "ok"
        try:
            fn = _find(namespace, case["fn_name"])
            signal.setitimer(signal.ITIMER_REAL, per_case_timeout)
            try:
                result = fn(*copy.deepcopy(case["args"]))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            expected = case["expected"]
            passed = values_equal(result, expected) or (
                isinstance(expected, list)
                and len(expected) == 1
                and values_equal(result, expected[0])
            )
            if not passed:
                note = "wrong"
        except _CaseTimeout:
            passed, note = False, "timeout"
        except BaseException as err:  # the candidate raised (SystemExit included)
            passed, note = False, "error:" + type(err).__name__
        sys.stdout = io.StringIO()
        print(f"{nonce} {i} {int(passed)} {note}", file=out, flush=True)


if __name__ == "__main__":
    main()
