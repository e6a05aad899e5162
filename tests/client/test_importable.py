"""The device client library imports none of the server's dependencies.

Devices install ``node.client`` (websockets + msgpack); a device must not need
ZeroMQ, Starlette, uvicorn, cffi, prometheus_client or PyJWT to send telemetry.
"""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO

SERVER_ONLY = ("zmq", "starlette", "uvicorn", "cffi", "prometheus_client", "jwt", "httptools", "uvloop")

_BLOCKER = f"""
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_ONLY!r}:
            raise ImportError(f"server-only dependency imported by the client: {{name}}")
        return None
sys.meta_path.insert(0, _Block())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER + code], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_client_library_imports_without_server_dependencies() -> None:
    done = _run(
        "import node.client, node.client.device, node.client.outbox, node.client.__main__\n"
        "from node.client import connect, DeviceClient, Backoff, Outbox\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{SERVER_ONLY!r}))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_client_command_help_runs_without_server_dependencies() -> None:
    done = _run(
        "import runpy, sys\n"
        "sys.argv = ['node.client', '--help']\n"
        "runpy.run_module('node.client', run_name='__main__')"
    )
    assert done.returncode == 0, done.stderr
    assert "--device" in done.stdout
