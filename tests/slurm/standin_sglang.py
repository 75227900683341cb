"""STAND-IN SGLang server / sglang-router for the disaggregated sbatch test (no GPU).

    standin_sglang.py server --model-path M --host H --port P [other server flags]
    standin_sglang.py router --worker-urls U1 U2 ... --host H --port P [other flags]
    python -m standin_sglang_router --worker-urls ...   (the router, as a module)

Takes the real programs' flags (unknown ones are ignored), answers GET /health, and
the router answers GET /workers with its worker URLs (as JSON) once every worker is
healthy. The API key is taken as the real programs take it: a server from the
`api-key:` entry of its `--config` YAML file, the router from `--api-key`; with a key,
every path but /health answers 401 without `Authorization: Bearer <key>` (as SGLang
0.5.23 and sglang-router 0.3.2 do). Its first output line says whether it has a key and
whether the key is on its own command line (/proc/self/cmdline: what `ps` shows).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _config_key(path: str | None) -> str | None:
    if path is None:
        return None
    for line in Path(path).read_text().splitlines():
        if line.startswith("api-key:"):
            return line.split(":", 1)[1].strip()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("server", "router"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-path")
    parser.add_argument("--worker-urls", nargs="*", default=[])
    parser.add_argument("--config", default=None)
    parser.add_argument("--api-key", default=None)
    args, _unknown = parser.parse_known_args(argv)
    if args.role == "server" and not args.model_path:
        parser.error("server needs --model-path")
    key = args.api_key if args.role == "router" else _config_key(args.config)
    auth = {"Authorization": f"Bearer {key}"} if key else {}

    def workers_healthy() -> bool:
        for url in args.worker_urls:
            try:
                with urllib.request.urlopen(urllib.request.Request(url + "/health", headers=auth),
                                            timeout=2):  # fmt: skip
                    pass
            except OSError:
                return False
        return True

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if key and self.path != "/health" and self.headers.get("Authorization") != auth.get(
                "Authorization"
            ):
                self._reply(401, b"Unauthorized")
            elif self.path == "/health" and (args.role == "server" or workers_healthy()):
                self._reply(200, b"ok")
            elif self.path == "/workers" and args.role == "router":
                self._reply(200, json.dumps(args.worker_urls).encode())
            else:
                self._reply(503 if self.path == "/health" else 404, b"no")

        def _reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    cmdline = Path("/proc/self/cmdline").read_bytes().decode(errors="replace")
    print(
        f"standin {args.role} on {args.host}:{args.port} model={args.model_path} "
        f"workers={args.worker_urls} key={'yes' if key else 'no'} "
        f"key_on_cmdline={bool(key) and key in cmdline}",
        flush=True,
    )
    if key:
        print(f"standin {args.role} key {key} (the job script must redact this)", flush=True)
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
