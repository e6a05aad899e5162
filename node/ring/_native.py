"""The compiled C helper (``node.ring._chelper``), imported in one place.

Built by ``pip install -e .`` (setup.py ``cffi_modules``) or
``python node/ring/_cbuild.py``.
"""

from __future__ import annotations

from node.ring.errors import RingError

try:
    from node.ring._chelper import ffi, lib  # type: ignore[import-not-found]
except ImportError as exc:  # pragma: no cover - a build problem, not a runtime path
    raise RingError(
        f"the ring's C helper node.ring._chelper is not built ({exc});"
        " run `pip install -e .` or `python node/ring/_cbuild.py` in the repository root"
    ) from exc

__all__ = ["ffi", "lib"]
