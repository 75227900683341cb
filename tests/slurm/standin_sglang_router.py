"""`python -m standin_sglang_router FLAGS`: the stand-in router as a module, so the job
script starts it as it starts `python -m sglang_router.launch_router` (through its
API-key wrapper)."""

from __future__ import annotations

import sys

from standin_sglang import main

if __name__ == "__main__":
    sys.exit(main(["router", *sys.argv[1:]]))
