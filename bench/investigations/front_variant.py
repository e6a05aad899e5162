"""Run the web front with a chosen commit mode, for the measurements in docs/front.md.

    NODE_DATA_DIR=/tmp/x NODE_WEB_PORT=18800 NODE_WEB_WORKERS=1 \\
        python -m bench.investigations.front_variant thread|inline|auto

Same settings as ``python -m node.workers.web``; only the committer's mode differs.
Then load it with the bench harness (``python -m bench max --url ...``);
``python -m bench.investigations.front_handshake`` starts it in ``auto`` mode.
"""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette

from node.config import load_settings
from node.front.app import create_app
from node.workers.web import uvicorn_options

MODE = "auto"


def factory() -> Starlette:  # uvicorn factory
    return create_app(commit_mode=MODE)


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in ("thread", "inline", "auto"):
        raise SystemExit("usage: python -m bench.investigations.front_variant thread|inline|auto")
    settings = load_settings()
    options = uvicorn_options(settings)
    if settings.web_workers != 1:
        raise SystemExit("front_variant runs one worker (NODE_WEB_WORKERS=1): the mode is a module global")
    options.pop("workers")
    global MODE
    MODE = sys.argv[1]
    uvicorn.run(factory, **options)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
