"""Nothing a benchmark started outlives it: its child process trees stop on any exit, SIGTERM and SIGINT too.

Every benchmark that starts processes calls `stop_children_on_exit()` first thing in
`main()`. From then on:

* SIGTERM and SIGINT raise `SystemExit(128 + signal)` in the main thread (once; later
  ones are ignored while cleaning up), so the benchmark's own ``finally`` blocks run as
  on any error: fleets stopped, brokers stopped, proxies closed. Without this a SIGTERM
  ends Python on the spot, and whatever the benchmark started in a session of its own
  (brokers, fedmq processes, Flower's SuperLink and SuperNodes) runs on, orphaned.
* At interpreter exit, `stop_all()` stops whatever is still running: every live
  descendant of this process, and the members of every process group recorded with
  `track()` (a child started in a session of its own leads one): a Flower ClientApp
  whose SuperExec died is no longer below this process, but still in its SuperNode's
  group. SIGTERM first, then SIGKILL after a grace period.

`kill_tree()` stops one process tree now (a system between two scenarios), its
recorded group included.

A process that leaves its group (a session of its own) after its parent died escapes
both; none of the systems benchmarked here does that.
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
    leader has died. `kill_tree` forgets it again."""
    pid = proc if isinstance(proc, int) else proc.pid
    try:
        leader = psutil.Process(pid)
        with _lock:
            _groups[os.getpgid(pid)] = leader.create_time()
    except (psutil.Error, ProcessLookupError):
        pass


def _table() -> dict[int, tuple[int, int, float]]:
    """pid -> (ppid, pgid, create time) of every live process (one scan)."""
    out = {}
    for p in psutil.process_iter(["ppid", "create_time", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE:
                out[p.pid] = (p.info["ppid"], os.getpgid(p.pid), p.info["create_time"] or 0.0)
        except (ProcessLookupError, PermissionError):
            pass
    return out


def _members(groups: dict[int, float]) -> list[psutil.Process]:
    """Live members of the recorded `groups` (group id -> its leader's create time).

    pid_max is often 32768, so a group id can be handed out again once its group is
    empty: a process counts only if it was created after the leader and either the
    leader still lives (then the id is still its group's), or it hangs below an orphan
    of the group (its top ancestor in the group was re-parented to init) or below this
    process -- never an unrelated group that happens to reuse the number."""
    table, me, out = _table(), os.getpid(), []
    for pid, (ppid, pgid, created) in table.items():
        since = groups.get(pgid)
        if since is None or created < since - 0.05 or pid == me:
            continue
        leader = table.get(pgid)
        top = pid
        while (parent := table[top][0]) in table and table[parent][1] == pgid and parent != top:
            top = parent
        if (leader is not None and abs(leader[2] - since) < 0.05) or table[top][0] in (0, 1, me):
            try:
                out.append(psutil.Process(pid))
            except psutil.Error:
                pass
    return out


def stop_all(grace: float = GRACE_SECONDS) -> None:
    """SIGTERM every descendant of this process and every member of a recorded group,
    wait up to `grace` seconds, then SIGKILL what is left."""
    me = os.getpid()
    try:
        below = psutil.Process(me).children(recursive=True)
    except psutil.Error:
        below = []
    with _lock:
        groups = dict(_groups)
    groups.pop(os.getpgid(0), None)
    victims = {p.pid: p for p in below + _members(groups) if p.pid != me}
    for p in victims.values():
        _signal(p, signal.SIGTERM)
    _, alive = psutil.wait_procs(list(victims.values()), timeout=grace)
    for p in alive + _members(groups):  # late forks of a dying group too
        _signal(p, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)
    with _lock:
        _groups.clear()


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
    with _lock:
        group = {proc.pid: _groups[proc.pid]} if proc.pid in _groups else {}
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
    for p in _members(group):  # orphans of its group that no one saw
        _signal(p, signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    with _lock:
        _groups.pop(proc.pid, None)


def _kill_pid(pid: int, started: float) -> None:
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - started) > 0.05 or p.status() == psutil.STATUS_ZOMBIE:
            return
        os.kill(pid, signal.SIGKILL)
    except (psutil.Error, ProcessLookupError, PermissionError):
        pass

