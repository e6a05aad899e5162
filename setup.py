"""Build hook for the C helpers: the ring's (cffi API mode and a CPython extension) and the
VictoriaMetrics sink's line protocol formatter, the PostgreSQL sink's COPY formatter and the
sinks' columnar store reader (CPython extensions).

Everything else is in pyproject.toml; setuptools needs this file only for
``cffi_modules``.  The helper has no link-time dependency on libpmem: libpmem is
loaded at run time when present, so a machine without it still builds and runs.
"""

from setuptools import Extension, setup

setup(
    cffi_modules=["node/ring/_cbuild.py:ffibuilder"],
    # Ring.append_batch hands its list of bytes to the C helper through this (no join)
    # and the VictoriaMetrics sink formats its line protocol with this (node/storage/_vmlines.c)
    ext_modules=[
        Extension("node.ring._gather", ["node/ring/_gather.c"], extra_compile_args=["-O2", "-Wall"]),
        Extension(
            "node.storage._vmlines",
            ["node/storage/_vmlines.c"],
            depends=["node/storage/_cout.h"],
            extra_compile_args=["-O2", "-Wall"],
        ),
        # and the PostgreSQL sink its COPY text of a batch read in columns (node/storage/_pgcopy.c)
        Extension(
            "node.storage._pgcopy",
            ["node/storage/_pgcopy.c"],
            depends=["node/storage/_cout.h"],
            extra_compile_args=["-O2", "-Wall"],
        ),
        # the sinks read the SQLite store in columns with this (node/storage/_storeread.c); it
        # dlopen()s the libsqlite3 Python's sqlite3 module uses, so it links only libdl
        Extension(
            "node.storage._storeread",
            ["node/storage/_storeread.c"],
            extra_compile_args=["-O2", "-Wall"],
            libraries=["dl"],
        ),
    ],
)
