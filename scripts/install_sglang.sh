#!/usr/bin/env bash
# Install the real SGLang 0.5.23 server (and sglang-router 0.3.2) into a venv of its own,
# for the real-server tests in tests/sglang_real/. CPU only; recipe measured in the
# project's SGLang-on-CPU notes: no CUDA packages, the local torch 2.13.0 CPU wheel,
# SGLang's runtime imports installed by hand, torchvision's fake-op registrations guarded.
#
# The venv is cached between runs on one machine: a finished install leaves a stamp
# naming the pinned versions and later runs return at once.
#   ARCHER_SGLANG_VENV  where the venv goes (default ~/.cache/archer-mcore/sglang-0.5.23)
#   ARCHER_SGLANG_LOCK  the constraints every pip call takes (default locks/sglang.txt,
#                       the versions the real-server tests passed with; empty: none, as
#                       `make lock` and `make check-latest` resolve anew)
# Exit status: 0 when the venv is ready, non-zero otherwise (tests/sglang_real runs this
# script: they skip on failure, or fail under CI=true).
set -euo pipefail

SGLANG_VERSION=0.5.23
ROUTER_VERSION=0.3.2
TORCH_VERSION=2.13.0
VENV="${ARCHER_SGLANG_VENV:-$HOME/.cache/archer-mcore/sglang-$SGLANG_VERSION}"
STAMP="$VENV/.archer-installed"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
LOCK="${ARCHER_SGLANG_LOCK-$REPO/locks/sglang.txt}"
LOCK_ARGS=()
LOCK_ID="unlocked"
if [[ -n "$LOCK" ]]; then
    LOCK_ARGS=(--constraint "$LOCK")
    LOCK_ID="lock $(sha256sum "$LOCK" | cut -c1-16)"
fi
WANT="sglang==$SGLANG_VERSION sglang-router==$ROUTER_VERSION torch==$TORCH_VERSION $LOCK_ID"
PY="${PYTHON:-python3}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "sglang venv ready: $VENV"
    exit 0
fi

echo "installing $WANT into $VENV"
start=$(date +%s)
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${LOCK_ARGS[@]}")

# 1. the CPU torch first: everything after names it again so nothing replaces it.
"${PIP[@]}" "torch==$TORCH_VERSION"
# 2. SGLang itself without its declared dependencies (they pull CUDA wheels and another torch).
"${PIP[@]}" --no-deps "sglang==$SGLANG_VERSION"
# 3. what its imports need on the CPU path, plus the router and the test client's needs.
"${PIP[@]}" "torch==$TORCH_VERSION" aiohttp fastapi "uvicorn>=0.51" uvloop "pyzmq>=25.1.2" \
    orjson msgspec psutil pydantic requests numpy transformers==5.19.0 tokenizers==0.23.2 \
    safetensors sentencepiece==0.2.1 setproctitle "prometheus-client>=0.20.0" pybase64 \
    python-multipart interegular partial_json_parser einops tqdm regex packaging pillow \
    openai==2.8.0 anthropic tiktoken IPython scipy blobfile==3.0.0 distro easydict \
    watchfiles xxhash zstandard "python-dateutil<3" "llguidance>=1.7.6,<2.0.0" \
    openai-harmony==0.0.4 gguf compressed-tensors==0.18.0 apache-tvm-ffi==0.1.11 \
    torchvision==0.28.0 dill jsonschema soundfile "sglang-router==$ROUTER_VERSION"
# 4. xgrammar without its triton dependency (1 GB, unused on CPU).
"${PIP[@]}" --no-deps xgrammar==0.2.7

# 5. torchvision 0.28's wheel is a CUDA build: its _C does not load beside the CPU torch,
#    and torchvision/_meta_registrations.py then fails at import registering fake ops for
#    operators that do not exist. Skip those registrations when the ops are absent.
"$VENV/bin/python" - <<'PYEOF'
import pathlib, sysconfig
path = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
text = path.read_text()
marker = "# archer-mcore: fake-op registrations only when torchvision's ops loaded"
if marker not in text:
    anchor = "import torchvision.extension  # noqa: F401\n"
    if anchor not in text or '@torch.library.register_fake("torchvision::' not in text:
        raise SystemExit(f"{path}: layout changed; update the guard in install_sglang.sh")
    guard = (
        f"{anchor}\n{marker}\n"
        "_archer_register_fake = (torch.library.register_fake\n"
        "                         if torchvision.extension._has_ops() else\n"
        "                         lambda *a, **k: (lambda fn: fn))\n"
    )
    text = text.replace(anchor, guard, 1).replace(
        '@torch.library.register_fake("torchvision::', '@_archer_register_fake("torchvision::')
    path.write_text(text)
print("guarded", path)
PYEOF

# smoke: the server module and the router import with the shims on the path.
SHIMS="$REPO/tests/sglang_real/shims"
(cd "$VENV" && PYTHONPATH="$SHIMS" SGLANG_USE_CPU_ENGINE=1 "$VENV/bin/python" -c \
    "import sglang, sglang.srt.entrypoints.http_server, sglang_router; print('sglang', sglang.__version__)")

echo "$WANT" > "$STAMP"
echo "sglang venv ready: $VENV ($(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1))"
