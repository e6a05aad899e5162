"""iotnode: a durable, high-performance IoT ingestion node.

See ``DESIGN.md`` (contracts) and ``README.md`` (running it).
"""

__version__ = "0.1.0"
