"""iotnode load harness: ``python -m bench c10k | max | soak | compare``.

Modules, one concept each:

* :mod:`bench.hist`     -- mergeable log-linear latency histogram (µs, ~1.6 % precision)
* :mod:`bench.proto`    -- device protocol v1 and MQTT 3.1.1 framing, tokens; no I/O
* :mod:`bench.loadgen`  -- one load-generator process (picows on uvloop)
* :mod:`bench.runner`   -- spreads a scenario over generator processes, aggregates, samples the target
* :mod:`bench.procstat` -- CPU/RSS of the target's processes from /proc, ring depths from /metrics
* :mod:`bench.targets`  -- starts and stops the systems under test on loopback
* :mod:`bench.report`   -- JSON results and a self-contained HTML/SVG report
* :mod:`bench.servers`  -- the baseline fronts (no-op, Redis Streams) the node is compared with
"""
