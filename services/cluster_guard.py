"""Stop the processes of an embedded Ray cluster whose driver is gone. Standard library only.

Why: Ray gives the GCS and the raylet of a ``ray.init`` cluster PR_SET_PDEATHSIG, so they die
with a SIGKILLed driver, but the raylet's children (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) then block reporting the raylet's death to the dead GCS and never
exit. Every process of an embedded cluster inherits ``MARK_VAR=<mark>`` from the driver (set
while ``ray.init`` spawns them; the raylet passes it on to its agents and workers), where the
mark is ``<driver pid>.<driver start time>.<random>``; and every one keeps its log files open
in the cluster's session directory. Two ways the leftovers are stopped:

- ``services.cluster`` runs this file as a guard, ``python -I cluster_guard.py <mark>
  <session dir>``, in its own session, its stdin a pipe only the driver writes to: when the
  driver dies, however, the read returns EOF and the guard stops every process that carries the
  mark or holds a file of the session open (a renamed process, ``ray::DashboardAgent``, has
  overwritten part of its environment block with its title, so the mark alone could be missed);
- ``reap_orphans`` (at the next embedded start) stops the processes of any mark whose driver is
  no longer running, and those holding files of its session open (the session records its mark
  in ``MARK_FILE``), for when the guard was killed too.

Linux only (it reads /proc); elsewhere it finds nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

MARK_VAR = "FMRL_EMBEDDED_RAY"
MARK_FILE = "fmrl_embedded_mark"  # in the session directory: the mark of the driver that started it
GRACE_S = 3.0  # SIGTERM first, SIGKILL after this


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), which tells a process from a
    later one that reuses its pid; None if there is no such process or it is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return None if fields[0] in ("Z", "X") else fields[19]


def marks() -> dict[int, str]:
    """{pid: mark} of every live process (of this user) that carries a mark."""
    key = MARK_VAR.encode() + b"="
    found = {}
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        for entry in env.split(b"\0"):
            if entry.startswith(key):
                found[int(d.name)] = entry[len(key):].decode(errors="replace")
    return found


def holding(root: str) -> list[int]:
    """The live processes (of this user) with a file under the directory ``root`` open."""
    prefix = root.rstrip("/") + "/"
    found = []
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if any(os.readlink(f).startswith(prefix) for f in (d / "fd").iterdir()):
                found.append(int(d.name))
        except OSError:  # gone, or another user's
            continue
    return found


def driver_alive(mark: str) -> bool:
    """Whether the driver that set ``mark`` still runs (a mark not of our making counts as alive)."""
    try:
        pid, started, _ = mark.split(".", 2)
        return start_time(int(pid)) == started
    except ValueError:
        return True


def stop(pids: list[int]) -> list[int]:
    """SIGTERM ``pids``, SIGKILL those alive after GRACE_S; returns those still alive after that."""
    born = {p: start_time(p) for p in pids}
    left = [p for p in pids if born[p] is not None]
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, GRACE_S)):
        for p in left:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [p for p in left if start_time(p) == born[p]]
    return left


def reap_orphans(ray_root: Path | None = None) -> list[int]:
    """Stop the processes of every embedded cluster whose driver is gone; returns their pids.

    They are found by their mark and, for the clusters under ``ray_root`` (Ray's temporary
    directory; each embedded start leaves ``MARK_FILE`` in its session directory), by the files
    of their session they hold open: a renamed process whose environment block no longer shows
    the mark is found that way, as the guard finds it."""
    found = marks()
    dead = {m for m in set(found.values()) if not driver_alive(m)}
    pids = {p for p, m in found.items() if m in dead}
    records = []
    for record in sorted(ray_root.glob(f"session_*/{MARK_FILE}")) if ray_root is not None else ():
        try:
            mark = record.read_text().strip()
        except OSError:
            continue
        if not driver_alive(mark):
            records.append(record)
            pids |= set(holding(str(record.parent)))
    stop(sorted(pids))
    for record in records:  # reaped: not looked at again
        record.unlink(missing_ok=True)
    return sorted(pids)


def main(mark: str, session: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):  # returns b"" only when the driver's end is closed
        pass
    driver = int(mark.split(".", 1)[0])
    stopped, left = 0, []
    for _ in range(3):  # again, for a process a dying one started while the first sweep ran
        pids = {p for p, m in marks().items() if m == mark} | set(holding(session))
        pids.discard(driver)
        if not pids:
            break
        left = stop(sorted(pids))
        stopped += len(pids) - len(left)
    if stopped or left:
        print(f"cluster_guard: stopped {stopped} processes of {session}"
              + (f"; still alive: {left}" if left else ""), file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
