"""Build hook for the ring's small C helper (cffi API mode).

Everything else is in pyproject.toml; setuptools needs this file only for
``cffi_modules``.  The helper has no link-time dependency on libpmem: libpmem is
loaded at run time when present, so a machine without it still builds and runs.
"""

from setuptools import Extension, setup

setup(
    cffi_modules=["node/ring/_cbuild.py:ffibuilder"],
    # Ring.append_batch hands its list of bytes to the C helper through this (no join)
    ext_modules=[
        Extension("node.ring._gather", ["node/ring/_gather.c"], extra_compile_args=["-O2", "-Wall"])
    ],
)
