"""The device front (the ``web`` box): protocol v1 over WebSocket, group commit, acks after persist.

* :mod:`node.front.app` — the Starlette endpoint ``/v1/ingest``, a thin adapter over
  :mod:`node.protocol` and the committer;
* :mod:`node.front.committer` — group commit: one ring append + persist for the frames
  of every connection of a worker, then the acks;
* :mod:`node.front.metrics` — the uvicorn factory that wraps the app with its metrics
  and the multiprocess ``/metrics``.

The process entry is :mod:`node.workers.web`.
"""
