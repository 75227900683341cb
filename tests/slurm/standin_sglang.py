"""STAND-IN SGLang server / sglang-router for the disaggregated sbatch test (no GPU).

    standin_sglang.py server --model-path M --host H --port P [other server flags]
    standin_sglang.py router --worker-urls U1 U2 ... --host H --port P [other flags]

Takes the real programs' flags (unknown ones are ignored), answers GET /health, and
the router answers GET /workers with its worker URLs (as JSON) once every worker is
healthy.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("server", "router"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-path")
    parser.add_argument("--worker-urls", nargs="*", default=[])
    args, _unknown = parser.parse_known_args()
    if args.role == "server" and not args.model_path:
        parser.error("server needs --model-path")

    def workers_healthy() -> bool:
        for url in args.worker_urls:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    pass
            except OSError:
                return False
        return True

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health" and (args.role == "server" or workers_healthy()):
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

    print(
        f"standin {args.role} on {args.host}:{args.port} model={args.model_path} "
        f"workers={args.worker_urls}",
        flush=True,
    )
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
