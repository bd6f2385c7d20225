"""Structured, quiet-by-default logging: one line per record, ``key=value`` pairs."""
from __future__ import annotations

import logging
import sys

_STD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class KVFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}", f"level={record.levelname.lower()}",
                 f"logger={record.name}", f"msg={record.getMessage()!r}"]
        for k, v in record.__dict__.items():
            if k not in _STD:
                parts.append(f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "warning") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KVFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))
