"""Nothing a benchmark started outlives it: its child process trees are stopped on any exit, SIGTERM and SIGINT included.

Every benchmark that starts processes calls `stop_children_on_exit()` first thing in
`main()`. From then on:

* SIGTERM and SIGINT raise `SystemExit(128 + signal)` in the main thread (once; later
  ones are ignored while cleaning up), so the benchmark's own ``finally`` blocks run as
  on any error: fleets stopped, brokers stopped, proxies closed. Without this a SIGTERM
  ends Python on the spot, and whatever the benchmark started in a session of its own
  (brokers, fedmq processes, Flower's SuperLink and SuperNodes) runs on, orphaned.
* At interpreter exit, `stop_all()` stops whatever is still running: every process
  group that a live descendant of this process belongs to, and every group recorded
  with `track()` (a group outlives its leader: a Flower ClientApp whose SuperNode died
  is still in the SuperNode's group, though no longer below this process). SIGTERM
  first, then SIGKILL after a grace period.

`kill_tree()` stops one process tree now (a system between two scenarios).

A process that creates a session of its own *below* a child (none of the systems
benchmarked here does) escapes the group kill, but not the descendant scan while its
parent lives.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
from typing import Any

import psutil

GRACE_SECONDS = 10.0

_groups: dict[int, float] = {}  # process group id -> create time of its leader (when recorded)
_lock = threading.Lock()
_installed = False
_stopping = False


def stop_children_on_exit() -> None:
    """Turn SIGTERM and SIGINT into `SystemExit` and stop every child tree at exit (see module doc)."""
    global _installed
    if _installed:
        return
    _installed = True
    atexit.register(stop_all)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)


def _on_signal(signum: int, _frame: Any) -> None:
    global _stopping
    if _stopping:
        return  # cleaning up already: a second Ctrl-C must not cut it short
    _stopping = True
    raise SystemExit(128 + signum)


def track(proc: subprocess.Popen | int) -> None:
    """Remember the process group of a child started in a session of its own
    (`start_new_session=True`), so `stop_all` finds its members even after the
    leader has died."""
    pid = proc if isinstance(proc, int) else proc.pid
    try:
        leader = psutil.Process(pid)
        with _lock:
            _groups[os.getpgid(pid)] = leader.create_time()
    except (psutil.Error, ProcessLookupError):
        pass


def _members(groups: dict[int, float]) -> list[psutil.Process]:
    """Live processes of `groups` (group id -> its leader's create time): only those
    created after the leader, so a group id the kernel has since reused is left alone."""
    out = []
    for p in psutil.process_iter(["create_time"]):
        try:
            since = groups.get(os.getpgid(p.pid))
        except (ProcessLookupError, PermissionError):
            continue
        if since is not None and (p.info["create_time"] or 0.0) >= since - 0.05:
            out.append(p)
    return out


def stop_all(grace: float = GRACE_SECONDS) -> None:
    """SIGTERM every descendant of this process and every member of a recorded group,
    wait up to `grace` seconds, then SIGKILL what is left."""
    me = os.getpid()
    own_group = os.getpgid(0)
    try:
        below = psutil.Process(me).children(recursive=True)
    except psutil.Error:
        below = []
    with _lock:
        groups = dict(_groups)
    for p in below:
        if (g := _pgid(p)) is not None:
            groups.setdefault(g, 0.0)
    groups.pop(own_group, None)
    victims = {p.pid: p for p in below + _members(groups) if p.pid != me}
    for p in victims.values():
        _signal(p, signal.SIGTERM)
    _, alive = psutil.wait_procs(list(victims.values()), timeout=grace)
    for p in alive + _members(groups):  # late forks of a dying group too
        if p.pid != me:
            _signal(p, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)
    with _lock:
        _groups.clear()


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except (ProcessLookupError, PermissionError):
        return None


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def descendants(pid: int) -> dict[int, float]:
    """PID -> start time of every live descendant of `pid` (start times guard against
    signalling a PID the kernel has since handed to an unrelated process)."""
    out: dict[int, float] = {}
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return out
    for c in children:
        try:
            out[c.pid] = c.create_time()
        except psutil.Error:
            pass
    return out


def kill_tree(proc: subprocess.Popen, known: dict[int, float] | None = None, timeout: float = GRACE_SECONDS) -> None:
    """SIGTERM a process we started, wait, then SIGKILL it and every descendant by PID.

    `known` adds descendants seen earlier (children re-parented when their parent
    died are no longer found below it).
    """
    pids = {**(known or {}), **descendants(proc.pid)}
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    pids.update(descendants(proc.pid))
    if proc.poll() is None:
        proc.kill()
    for pid, started in sorted(pids.items()):
        _kill_pid(pid, started)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _kill_pid(pid: int, started: float) -> None:
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - started) > 0.05 or p.status() == psutil.STATUS_ZOMBIE:
            return
        os.kill(pid, signal.SIGKILL)
    except (psutil.Error, ProcessLookupError, PermissionError):
        pass

