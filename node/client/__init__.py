"""Device client library for protocol v1 (DESIGN.md contract 3), asyncio.

A device gets the node's no-loss promise end to end: every message is kept until
the node acks it, resent in order after any disconnect, optionally kept on the
device's disk (``outbox=``) so it survives a reboot; reconnects use exponential
backoff with full jitter so a fleet does not come back in lock-step after an
outage.

::

    import asyncio
    from node.client import connect

    async def main():
        client = await connect("ws://127.0.0.1:8000/v1/ingest", token)
        fut = await client.send({"temp": 21.5})   # waits only if the window is full
        seq = await fut                            # resolved by the node's ack
        await client.close()                       # flushes first

    asyncio.run(main())

The frames are encoded and the replies decoded by :mod:`node.protocol` (the one
implementation of the wire format); this module is only the connection, the
window, the retries and the futures.

Exceptions (all under :class:`node.errors.NodeError`)::

    ClientError
    ├── HandshakeRefused    the node refused the token (HTTP 401/403): not retried
    ├── MessageRejected     the node answered {"error": reason, "seq": n}: not resent
    ├── MessageTooLarge     (also ValueError) over the known frame limit, locally or
    │                       by the node's close 1009: not resent
    └── ClientClosed        the client was closed before the message was acked
                            (it stays in the outbox, if there is one)
    node.protocol.ProtocolError (ValueError): data the node would refuse, raised
        by send() before anything is sent

``python -m node.client`` sends JSON lines from stdin as a device (see ``--help``
and docs/client.md).
"""

from node.client.device import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Backoff,
    ClientClosed,
    ClientError,
    DeviceClient,
    HandshakeRefused,
    MessageRejected,
    MessageTooLarge,
    connect,
)
from node.client.outbox import Outbox, OutboxError

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Backoff",
    "ClientClosed",
    "ClientError",
    "DeviceClient",
    "HandshakeRefused",
    "MessageRejected",
    "MessageTooLarge",
    "Outbox",
    "OutboxError",
    "connect",
]
