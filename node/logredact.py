"""Keep credentials out of every log line, whatever logger wrote it, at every level.

:class:`RedactSecrets` is a ``logging.Filter`` for *handlers*: a handler filter sees
every record the handler emits, also the ones propagated from child loggers
(``uvicorn.error``, the websockets protocol logging through it at debug level,
``iotnode.*``, ``node.*``).  It rewrites, in the formatted message and in the
traceback text:

* every JWT-shaped string (``eyJ...``.``...``.``...``: base64url of ``{"``, three
  segments) -> ``<redacted-jwt>``;
* the value of an ``Authorization`` header, in any rendering (``Authorization:
  Bearer x``, ``(b'authorization', b'Bearer x')``) -> ``<redacted>`` (also a bad,
  not JWT-shaped credential);
* the value of a query parameter whose *decoded* name is ``token`` (``?%74oken=``
  authenticates just like ``?token=``), or whose decoded value is JWT-shaped.

:func:`install` adds the filter to the handlers of the root logger and of every
logger configured so far, and to ``logging.lastResort``; both servers call it once
logging is set up (the web front in each worker, after uvicorn configured its
loggers), and so do the stage processes.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

__all__ = ["RedactSecrets", "install", "redact"]

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")
_AUTHORIZATION = re.compile(r"(?i)(authorization['\"]?\s*[:=,]\s*b?['\"]?)[^\r\n'\"]+")
_QUERY_PARAM = re.compile(r"([?&;])([^=&\s\"'#?]*)=([^&\s\"'#;]*)")
_TOKEN_NAMES = frozenset({"token", "access_token", "jwt"})
_HINTS = ("eyj", "authorization", "token", "%")


def _param(match: re.Match[str]) -> str:
    sep, name, value = match.group(1), match.group(2), match.group(3)
    if unquote_plus(name).strip().lower() in _TOKEN_NAMES or _JWT.search(unquote_plus(value)):
        return f"{sep}{name}=<redacted>"
    return match.group(0)


def redact(text: str) -> str:
    """``text`` with every credential replaced (see the module docstring)."""
    lowered = text.lower()
    if not any(hint in lowered for hint in _HINTS):
        return text
    text = _QUERY_PARAM.sub(_param, text)
    text = _AUTHORIZATION.sub(r"\1<redacted>", text)
    return _JWT.sub("<redacted-jwt>", text)


class RedactSecrets(logging.Filter):
    """A handler filter: the record's message (and traceback) with credentials redacted."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: let the handler report it
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = RedactSecrets()


def install() -> None:
    """Add the filter to every handler configured so far (root, named loggers, lastResort)."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            loggers.append(logger)
    handlers = [h for logger in loggers for h in logger.handlers]
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(_FILTER)
