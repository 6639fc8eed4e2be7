"""Structured logging: one JSON object per line (or plain text for humans)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


#: What grpc's asyncio server logs (as an error, with a traceback) when a handler has finished but its
#: client cancelled the call first: only the final status could not be sent, to nobody.
_STATUS_TO_NOBODY = re.compile(
    r'Failed "execute_batch": \(<grpc\._cython\.cygrpc\.SendStatusFromServerOperation [^>]*>,\)'
)


class ClientGone(logging.Filter):
    """Downgrades grpc's error for a final status sent to a client that had
    already cancelled (a Draft or Decode stream that finished as the
    coordinator cancelled it) to a debug record: a race, not a failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ == "ExecuteBatchError" and _STATUS_TO_NOBODY.fullmatch(str(exc)):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, ClientGone) for f in grpc_log.filters):
        grpc_log.addFilter(ClientGone())
    if fmt == "json":  # keep stderr pure JSON lines: no progress bars from model loading
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
