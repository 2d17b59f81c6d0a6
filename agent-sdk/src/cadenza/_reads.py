"""Reads of run records shared by the tasks that need the same one.

Before starting a task an agent reads its run's record (is the attempt still current?).
A fan-out brings a hundred tasks of one run at once; a read each made the check the
larger part of their cost. Here the tasks of one run share reads: a task may use any
read that *began after the task arrived*, as that read sees every decision committed
before the task could be started. So a burst costs two reads, not one per task, and no
task ever acts on a record older than its own arrival.
"""

from __future__ import annotations

import asyncio
from typing import Any


class SharedReads:
    """`get(key)` of a KV bucket, shared by concurrent callers as described above."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self._reads: dict[str, tuple[float, asyncio.Future[Any]]] = {}

    async def get(self, key: str) -> Any:
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        while True:
            current = self._reads.get(key)
            if current is None:
                break
            began, read = current
            if began >= arrived:
                return await asyncio.shield(read)
            # That read began before this caller came: let it finish, then read afresh
            # (or join a read another later caller began meanwhile).
            await asyncio.wait([read])
            if self._reads.get(key) is current:
                del self._reads[key]
        read = loop.create_future()
        self._reads[key] = (loop.time(), read)
        try:
            read.set_result(await self.kv.get(key))
        except asyncio.CancelledError:
            read.cancel()  # those waiting on it read afresh
            raise
        except Exception as exc:
            read.set_exception(exc)
        finally:
            if self._reads.get(key, (0.0, None))[1] is read:
                del self._reads[key]
        return read.result()
