"""The client-app stream (the ``fanout`` box, contract 4).

* :mod:`node.fanout.hub` — one SUB socket on the publisher's live stream, the clients
  and their bounded queues, the per-device gap rule;
* :mod:`node.fanout.app` — the Starlette endpoint ``/v1/stream`` and ``/metrics``.

The process entry is :mod:`node.workers.fanout`.
"""
