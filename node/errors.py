"""Exceptions of the ``node`` package.

Tree (the ring has its own root, :class:`node.ring.errors.RingError`)::

    NodeError
    ├── ConfigError (also ValueError)   a NODE_* variable has a bad value
    ├── AuthError                       a token is missing, invalid or expired
    ├── RecordError (also ValueError)   bytes that are not a ring record envelope (node.record)
    ├── WireError (also ValueError)     a malformed inter-stage ZeroMQ message (node.wire)
    ├── SinkError                       a store sink failed (node.sinks.base); RecordRejected
    ├── ClientError                     the device client library (node.client)
    ├── MonitorError, RouterError       a stage cannot run (node.workers)
    ├── KeyFileError (also ValueError)  a CURVE key or key file is unusable (node.curve)

Protocol violations by devices are not exceptions that escape: the protocol
module turns them into error replies (see ``node.protocol``).
"""

from __future__ import annotations


class NodeError(Exception):
    """Root of every exception raised by the node package."""


class ConfigError(NodeError, ValueError):
    """A configuration variable has a value the node cannot use."""

    def __init__(self, variable: str, value: str, reason: str) -> None:
        self.variable = variable
        self.value = value
        self.reason = reason
        super().__init__(f"{variable}={value!r}: {reason}")


class AuthError(NodeError):
    """A token was refused.  ``status`` is the HTTP status to answer with."""

    def __init__(self, reason: str, status: int = 401) -> None:
        self.reason = reason
        self.status = status
        super().__init__(reason)
