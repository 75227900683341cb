"""Function-call test driver, shipped into the sandbox as main.py (stdlib only).

Usage inside the sandbox: `python main.py TAG PER_CASE_TIMEOUT_S` with `solution.py`
(the candidate) and `calls.json` (a list of {"fn_name", "args"}) beside it. The
expected return values are never shipped: this driver only *runs* the calls. It
executes the candidate as a module (its `__main__` block does not run), finds each
case's function (a top-level function, or a method of `class Solution` as in
LeetCode), calls it on a deep copy of the arguments with a per-case alarm, and prints
one line per case to the original stdout:

    TAG <index> ok <JSON of the return value>
    TAG <index> fail <note>          (raised, timed out, not JSON-serialisable)

The trusted parent (`archer_mcore.rewards.code_reward`) parses these lines and
compares the values with the expected ones itself. The candidate runs in this same
process and can print lines of this form too, but it cannot pass a case that way
without knowing the expected value, which never enters the sandbox. The TAG only keeps
stray output from being read as a result. The candidate's own prints go to a
discarded buffer.
"""

import copy
import io
import json
import signal
import sys


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
    tag, per_case_timeout = sys.argv[1], float(sys.argv[2])
    out = sys.stdout
    with open("calls.json") as f:
        calls = json.load(f)
    with open("solution.py") as f:
        source = f.read()
    sys.stdout = io.StringIO()
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException as err:
        sys.stdout = out
        for i in range(len(calls)):
            print(f"{tag} {i} fail load-error:{type(err).__name__}", file=out, flush=True)
        return
    signal.signal(signal.SIGALRM, _on_alarm)
    for i, call in enumerate(calls):
        try:
            fn = _find(namespace, call["fn_name"])
            signal.setitimer(signal.ITIMER_REAL, per_case_timeout)
            try:
                result = fn(*copy.deepcopy(call["args"]))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            line = f"{tag} {i} ok {json.dumps(result)}"
        except _CaseTimeout:
            line = f"{tag} {i} fail timeout"
        except BaseException as err:
            # the candidate raised (SystemExit included), or its value is not JSON
            # (a set, an object, a self-referencing list: TypeError/ValueError)
            line = f"{tag} {i} fail error:{type(err).__name__}"
        sys.stdout = io.StringIO()
        print(line, file=out, flush=True)  # json.dumps escapes newlines


if __name__ == "__main__":
    main()
