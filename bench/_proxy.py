"""Helpers for the benchmarks: a counting TCP proxy and process-tree RSS sampling (cleanup: _procs.py).

`CountingProxy` listens on 127.0.0.1 (one listener per label, e.g. "slaves" and
"master"), forwards every connection to one upstream address and counts the bytes in
each direction as they cross it: **up** = client -> server (what the connecting side
sent), **down** = server -> client. Every read is time-stamped, so bytes can be
attributed to rounds afterwards (`bytes_between`). Payload bytes of TCP only: no
TCP/IP headers, which are the same for both systems per segment, and loopback hides
segmentation anyway.

The proxy runs an asyncio loop in a daemon thread; the benchmark itself stays
synchronous.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import psutil

HOST = "127.0.0.1"
CHUNK = 256 * 1024


@dataclass
class _Series:
    """Cumulative byte count over time (append-only, for bisecting)."""

    times: list[float] = field(default_factory=lambda: [0.0])
    totals: list[int] = field(default_factory=lambda: [0])

    def add(self, n: int) -> None:
        self.times.append(time.time())
        self.totals.append(self.totals[-1] + n)

    def at(self, t: float) -> int:
        return self.totals[bisect.bisect_right(self.times, t) - 1]

    @property
    def total(self) -> int:
        return self.totals[-1]


class CountingProxy:
    """TCP proxy with per-label, per-direction byte counters (see module doc)."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.ports: dict[str, int] = {}
        self.series: dict[tuple[str, str], _Series] = {}
        self.connections: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="counting-proxy", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ control (any thread)

    def listen(self, label: str) -> int:
        """Open a listener for `label` on a free loopback port; return the port."""
        fut: Future[int] = asyncio.run_coroutine_threadsafe(self._listen(label), self._loop)
        port = fut.result(timeout=10)
        self.ports[label] = port
        return port

    def close(self) -> None:
        async def _close() -> None:
            for server in self._servers:
                server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.sleep(0)

        try:
            asyncio.run_coroutine_threadsafe(_close(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def total(self, label: str, direction: str) -> int:
        with self._lock:
            s = self.series.get((label, direction))
            return s.total if s else 0

    def bytes_between(self, label: str, direction: str, t0: float, t1: float) -> int:
        """Bytes of `label` in `direction` ("up"/"down") read in the interval (t0, t1]."""
        with self._lock:
            s = self.series.get((label, direction))
            return s.at(t1) - s.at(t0) if s else 0

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f"{label}_{d}": s.total for (label, d), s in self.series.items()}

    # ------------------------------------------------------------ asyncio side

    async def _listen(self, label: str) -> int:
        with self._lock:
            self.series.setdefault((label, "up"), _Series())
            self.series.setdefault((label, "down"), _Series())
            self.connections.setdefault(label, 0)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self._relay(label, reader, writer)
            finally:
                self._tasks.discard(task)

        server = await asyncio.start_server(handle, HOST, 0)
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def _relay(self, label: str, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections[label] += 1
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.close()
            return
        try:
            await asyncio.gather(self._pump(label, "up", c_reader, u_writer),
                                 self._pump(label, "down", u_reader, c_writer))
        except asyncio.CancelledError:
            pass
        finally:
            for w in (c_writer, u_writer):
                w.close()

    async def _pump(self, label: str, direction: str, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        series = self.series[(label, direction)]
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                with self._lock:
                    series.add(len(data))
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                if writer.can_write_eof():
                    writer.write_eof()
                else:
                    writer.close()
            except (OSError, RuntimeError):
                writer.close()


class RssSampler:
    """Samples process trees every `interval` seconds in a thread: RSS and CPU time.

    A group is a name for a root PID; its tree is the root and all its descendants
    alive at the sampling instant (one scan of the process table per tick). RSS of a
    tree is the sum over its processes (shared pages counted once per process, as `ps`
    does); short-lived children between two samples are missed. CPU time (user +
    system) is remembered per process, including zombies (the kernel keeps their
    counters until they are reaped), so `cpu_seconds` is what the tree used up to the
    last sample.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.roots: dict[str, int] = {}
        self.peak_tree: dict[str, int] = {}
        self.peak_single: dict[str, int] = {}
        self.samples: dict[str, int] = {}
        self.seen: dict[str, dict[int, float]] = {}  # group -> PID -> start time, for cleanup
        self.cpu: dict[str, dict[tuple[int, float], float]] = {}
        self.loadavg: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.roots[name] = pid
        for d, v in ((self.peak_tree, 0), (self.peak_single, 0), (self.samples, 0), (self.seen, {}), (self.cpu, {})):
            d.setdefault(name, v)  # type: ignore[attr-defined]

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def cpu_seconds(self, names: Iterable[str] | None = None) -> float:
        """CPU seconds used by the trees of `names` (default: every group)."""
        groups = self.cpu.keys() if names is None else names
        per_proc: dict[tuple[int, float], float] = {}
        for name in groups:
            for key, value in self.cpu.get(name, {}).items():
                per_proc[key] = max(per_proc.get(key, 0.0), value)
        return sum(per_proc.values())

    def sample_once(self) -> None:
        procs = proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, *_rest) in procs.items():
            children.setdefault(ppid, []).append(pid)
        for name, root in list(self.roots.items()):
            if root not in procs:
                continue
            stack, total, biggest = [root], 0, 0
            while stack:
                pid = stack.pop()
                stack.extend(children.get(pid, ()))
                _ppid, state, cpu, started, rss = procs[pid]
                if pid != root:
                    self.seen[name].setdefault(pid, started)
                self.cpu[name][(pid, started)] = cpu
                if state == "Z":
                    continue
                total += rss
                biggest = max(biggest, rss)
            self.peak_tree[name] = max(self.peak_tree[name], total)
            self.peak_single[name] = max(self.peak_single[name], biggest)
            self.samples[name] += 1
        self.loadavg.append(os.getloadavg()[0])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval)


_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_BOOT = psutil.boot_time()


def proc_table() -> dict[int, tuple[int, str, float, float, int]]:
    """PID -> (ppid, state, CPU seconds user+system, start time (epoch), RSS bytes),
    from one read of /proc/PID/stat per process (psutil's per-process objects are
    ~50x slower, too slow to sample every 0.2 s on a busy 2-core machine)."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        # fields[0] is field 3 of proc(5): state, ppid, ..., utime(14), stime(15), starttime(22), rss(24)
        out[int(entry.name)] = (int(fields[1]), fields[0].decode(), (int(fields[11]) + int(fields[12])) / _TICKS,
                                round(_BOOT + int(fields[19]) / _TICKS, 2), int(fields[21]) * _PAGE)
    return out

