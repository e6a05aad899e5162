"""The pipeline stages between the rings (the ``monitor``, ``router``, ``publisher`` and
``store`` boxes), each the logic of one process, free of process start-up:

* :mod:`node.pipeline.monitor` — consumer of the ingress ring, DEALER to the router,
  pops only what the router acked;
* :mod:`node.pipeline.router` — ROUTER of every monitor, appends to the fan-in ring,
  dedups per source ring, acks after persist;
* :mod:`node.pipeline.publisher` — consumer of the fan-in ring: the live XPUB stream and
  the FETCH/CONFIRM replay that durable subscribers pull from;
* :mod:`node.pipeline.store` — the durable subscriber that writes into a sink
  (:mod:`node.sinks`) exactly once;
* :mod:`node.pipeline.doorbell` — the coalescing wake-up of a drained stage.

The process entries are :mod:`node.workers` (one module per Procfile line).
"""
