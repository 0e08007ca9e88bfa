"""Where the CPU goes while the stack serves: CPU seconds per process of a process tree (and per
thread of the ones that matter), between two snapshots.

    cpu = ProcessCpu(root_pid, extra={"client": os.getpid()})
    before = cpu.snapshot(); ...; report = cpu.since(before, wall_s)

Processes are named by role from their command line (`lorafleet.cli engine` -> "engine",
tansu -> "broker", redis-server -> "redis"); threads by their OS name (/proc/<pid>/task/<tid>/comm:
Tansu names its workers, Python threads all carry the process's name, so tell those apart by
their CPU, or name them with py-spy). Figures are CPU seconds and the share of one core over the
window (1.0 = one core busy the whole time).
"""

from __future__ import annotations

import psutil

ROLES = ("adapter-store", "ingest", "engine", "up")


def role(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    if "redis-server" in cmd:
        return "redis"
    if "tansu" in cmd or "calfkit" in cmd:
        return "broker"
    for name in ROLES:
        if f"lorafleet.cli {name}" in cmd:
            return name
    return proc.name()


def _thread_name(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:  # gone meanwhile
        return str(tid)


class ProcessCpu:
    def __init__(self, root_pid: int | None, extra: dict[str, int] | None = None) -> None:
        """root_pid: a process whose whole tree is counted (None: none); extra: role -> pid."""
        self.root = psutil.Process(root_pid) if root_pid is not None else None
        self.extra = extra or {}

    def _processes(self) -> dict[int, str]:
        tree = [self.root, *self.root.children(recursive=True)] if self.root is not None else []
        procs = {p.pid: role(p) for p in tree}
        procs.update({pid: name for name, pid in self.extra.items()})
        return procs

    def snapshot(self) -> dict:
        snap = {}
        for pid, name in self._processes().items():
            try:
                p = psutil.Process(pid)
                t = p.cpu_times()
                threads = {th.id: th.user_time + th.system_time for th in p.threads()}
            except psutil.NoSuchProcess:
                continue
            snap[pid] = {"role": name, "cpu": t.user + t.system, "threads": threads,
                         "names": {tid: _thread_name(pid, tid) for tid in threads}}
        return snap

    def since(self, before: dict, wall_s: float, top_threads: int = 6) -> list[dict]:
        """Per process (busiest first): CPU seconds, cores used, and its busiest threads."""
        after = self.snapshot()
        rows = []
        for pid, now in after.items():
            was = before.get(pid, {"cpu": 0.0, "threads": {}})
            threads = sorted(((now["names"].get(tid, str(tid)), cpu - was["threads"].get(tid, 0.0))
                              for tid, cpu in now["threads"].items()), key=lambda x: -x[1])
            cpu = now["cpu"] - was["cpu"]
            rows.append({"role": now["role"], "pid": pid, "cpu_s": round(cpu, 2), "cores": round(cpu / wall_s, 2),
                         "threads": [{"name": n, "cpu_s": round(c, 2)} for n, c in threads[:top_threads] if c > 0.01]})
        return sorted(rows, key=lambda r: -r["cpu_s"])
