"""Baseline fronts the node is measured against (same stack: uvicorn + Starlette)."""
