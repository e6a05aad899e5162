"""The compiled C helpers, imported in one place.

``node.ring._chelper`` (cffi API mode, ``_cbuild.py``) and ``node.ring._gather`` (a
plain CPython extension, ``_gather.c``: hands a list of bytes to
``iotring_append_iov``).  Both are built by ``pip install -e .`` (setup.py).
"""

from __future__ import annotations

from node.ring.errors import RingError

try:
    from node.ring._chelper import ffi, lib  # type: ignore[import-not-found,import-untyped,unused-ignore]
    from node.ring._gather import append_list  # type: ignore[import-not-found,import-untyped,unused-ignore]
except ImportError as exc:  # pragma: no cover - a build problem, not a runtime path
    raise RingError(
        f"the ring's C helpers (node.ring._chelper, node.ring._gather) are not built ({exc});"
        " run `pip install -e .` in the repository root"
    ) from exc

#: address of iotring_append_iov, handed to append_list (node/ring/_gather.c)
APPEND_IOV = int(ffi.cast("uintptr_t", ffi.addressof(lib, "iotring_append_iov")))

__all__ = ["APPEND_IOV", "append_list", "ffi", "lib"]
