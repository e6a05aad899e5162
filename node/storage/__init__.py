"""The storage tier: external sinks that tail the embedded SQLite store.

Each sink (PostgreSQL, VictoriaMetrics, a Parquet lake) is its own process with
its own cursor, kept atomically in its own destination.  It reads the SQLite store
(contract 5) in ``rowid`` order -- the store's commit order, so per-device order is
kept and every ``(device_id, seq)`` is there exactly once -- enriches each row
with the device registry (:mod:`node.registry`), and writes it.  The publisher and
the fan-in ring never wait for these sinks: a destination that is down only makes
its sink's lag grow (docs/publisher-store.md, "Storage tier").

Modules::

    source     StoreLog: the SQLite store read as an ordered log (rowid cursor)
    enrich     Row: a stored record plus its device context
    tail       TailSink (the interface), SinkDown, and the tail loop of a sink process
    postgres   PostgreSQL (COPY into a staging table, INSERT ... ON CONFLICT DO NOTHING)
    victoria   VictoriaMetrics (Influx line protocol over HTTP /write)
    lake       Parquet lake (hive-partitioned files, cursor committed with them)
"""
