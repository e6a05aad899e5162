"""Tests of the load harness (bench/)."""

from __future__ import annotations

import argparse
from pathlib import Path


def e2e_args(tmp_path: Path, *options: str) -> argparse.Namespace:
    """``python -m bench e2e`` options as its own parser reads them: a small, quiet, one-round
    run (8 in flight, 2 s, one generator process, one web worker) plus ``options``."""
    from bench.__main__ import build_parser

    common = ["e2e", "-w", "8", "-d", "2", "--rounds", "1", "-p", "1", "--workers", "1", "-q"]
    return build_parser().parse_args([*common, "--out", str(tmp_path / "results"), *options])
