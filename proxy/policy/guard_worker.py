"""The parser process of guard_pool.py: reads SQL texts on standard input, writes verdicts.

Frames both ways are a 4-byte big-endian length and a JSON document: in, the guard's
configuration and the text; out, the verdict's fields.  One text at a time, so a crash
is the text's doing.
"""

from __future__ import annotations

import struct
import sys
from typing import BinaryIO

import orjson

from ..config import GuardConfig
from .guard import Guard


def _read(stream: BinaryIO) -> bytes | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack("!I", head)
    return stream.read(size)


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    guards: dict[bytes, Guard] = {}
    while (frame := _read(inp)) is not None:
        request = orjson.loads(frame)
        key = orjson.dumps(request["cfg"])
        guard = guards.get(key)
        if guard is None:
            cfg = request["cfg"]
            guard = guards[key] = Guard(GuardConfig(frozenset(cfg[0]), frozenset(cfg[1]), frozenset(cfg[2])))
            if len(guards) > 8:
                guards.pop(next(iter(guards)))
        v = guard.judge(request["sql"])
        body = orjson.dumps([v.command, v.fingerprint, v.rejection, v.row_limit, v.limit_param])
        out.write(struct.pack("!I", len(body)) + body)
        out.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
