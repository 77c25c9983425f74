"""The `streams` command line. Every option is also an environment variable (STREAMS_ +
the option name, e.g. STREAMS_DATA_DIR) and a key of the config file (`streams.toml`, or
--config / STREAMS_CONFIG), with flags first, then variables, then the file.

The group's options are accepted before or after the subcommand: `@command` gives every
subcommand a copy of them, whose values (when typed) override the group's. A subcommand
added later with `@command(...)` gets them too.

Exit codes: 0 done; 1 bad input data, a failed or unfinished batch; 2 a usage error (an
option, a setting or an argument is wrong); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from connectors.importer import ImportRefused, ImportResult
from connectors.rows import MODES, InputFileError
from processors.pipeline_state import BatchStatus
from streams import logs
from streams.batch_view import shown_status as _shown_status
from streams.batch_view import ts as _ts
from streams.child_worker import ChildWorker, ChildWorkerDied
from streams.group_options import GROUP_OPTIONS
from streams.operations import Operations
from streams.pipeline import (
    PROCESSOR_ROLES,
    ROLES,
    SINK_ROLES,
    Pipeline,
    check_roles,
    group_names,
    group_of,
)
from streams.progress import Progress, bytes_read
from streams.settings import Settings, load_config_file, unknown_keys
from streams.warehouse_wait import WarehouseBusy
from topics.log import GroupBusyError, TopicError, TopicPartition
from topics.partitioner import partition_for
from topics.spec import EVENTS

_FORMATS = ["csv", "tsv", "jsonl", "parquet"]
_MODE_WORDS = {"add": "add: the listed users join their segments",
               "remove": "remove: the listed users leave their segments",
               "replace": "replace: each named segment becomes exactly the listed users"}


class UsageProblem(click.ClickException):
    """A wrong option, setting or argument: one line, exit 2 (as click's usage errors)."""

    exit_code = 2


class Interrupted(click.ClickException):
    exit_code = 130


# ------------------------------------------------------------------- group options

# GROUP_OPTIONS (flags, settings of each) live in streams/group_options.py.
_CONFIG_HELP = "TOML config file (default: ./streams.toml if present)."
_OVERRIDES = "streams.overrides"


def _warn_unknown_config_keys(ctx: click.Context, config: dict[str, Any], source: str) -> None:
    known = {p.name for p in ctx.find_root().command.params if p.name}
    group = ctx.find_root().command
    if isinstance(group, click.Group):
        for sub in group.commands.values():
            known.update(p.name for p in sub.params if p.name)
            known.update(p.opts[0].lstrip("-").replace("-", "_") for p in sub.params
                         if isinstance(p, click.Option))
    for warning in unknown_keys(config, known - {"config"}):
        click.echo(f"warning: config file {source}: {warning}", err=True)


def _config_default_map(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    try:
        config = load_config_file(value)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageProblem(str(exc)) from None
    if config:
        _warn_unknown_config_keys(ctx, config, value or os.environ.get("STREAMS_CONFIG")
                                  or "streams.toml")
    commands = ctx.command.commands if isinstance(ctx.command, click.Group) else {}
    # Subcommands take their own keys (segment, roles, ...); the group's keys stay with the
    # group, below flags and variables (the subcommands' copies of them read no config).
    group_keys = {p.name for p in ctx.command.params}
    own = {k: v for k, v in config.items() if k not in group_keys}
    ctx.default_map = {**config, **{c: own for c in commands}}


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A group option typed after the subcommand: kept, to override the group's value.
    The copies read no variable and no config key, so a value means it was typed."""
    untyped = value is None or (value == () and getattr(param, "multiple", False)) or (
        value == 0 and getattr(param, "count", False))
    if param.name and not untyped:
        ctx.find_root().meta.setdefault(_OVERRIDES, {})[param.name] = value


def _late_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.find_root().meta["streams.late_config"] = value


def _group_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for decls, kwargs in reversed(GROUP_OPTIONS):
        f = click.option(*decls, **kwargs)(f)
    return click.option("--config", callback=_config_default_map, is_eager=True,
                        expose_value=False, help=_CONFIG_HELP)(f)


def _copied_group_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for decls, kwargs in reversed(GROUP_OPTIONS):
        copy = {k: v for k, v in kwargs.items() if k not in ("default", "show_default")}
        f = click.option(*decls, **copy, default=None, show_default=False, expose_value=False,
                         callback=_remember, allow_from_autoenv=False)(f)
    return click.option("--config", callback=_late_config, expose_value=False,
                        allow_from_autoenv=False, help=_CONFIG_HELP)(f)


def command(name: str | None = None, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
    """`@cli.command`, with the group's options accepted after the subcommand too."""
    def decorate(f: Callable[..., Any]) -> Any:
        return cli.command(name, **kwargs)(_copied_group_options(f))
    return decorate


@click.group(context_settings={"auto_envvar_prefix": "STREAMS", "show_default": True})
@_group_options
@click.pass_context
def cli(ctx: click.Context, **options: Any) -> None:
    """Import audience files into segments, deliver them to S3 and a warehouse."""
    sources = {name: ctx.get_parameter_source(name) for name in options}
    ctx.obj = {"options": options, "sources": sources, "settings": None}


def _settings(ctx: click.Context) -> Settings:
    """The settings: group options, then those typed after the subcommand; checked once,
    before anything is read or published."""
    root = ctx.find_root()
    state = root.obj
    if state["settings"] is not None:
        return state["settings"]
    options = dict(state["options"])
    late = root.meta.get("streams.late_config")
    if late is not None:  # --config after the subcommand: fills what flags and env left
        try:
            config = load_config_file(late)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageProblem(str(exc)) from None
        _warn_unknown_config_keys(ctx, config, late)
        for key, value in config.items():
            if key in options and state["sources"].get(key) in (
                    ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None):
                options[key] = value
    options.update(root.meta.get(_OVERRIDES, {}))
    verbose = int(options.pop("verbose", 0) or 0)
    logs.configure(verbose, options.get("log_format") or "human")
    try:
        settings = Settings.build(options)
    except (TypeError, ValueError) as exc:
        raise UsageProblem(str(exc)) from None
    problems = settings.problems()
    if problems:
        raise UsageProblem("; ".join(problems))
    if settings.backend == "embedded":
        try:
            settings.check_data_dir()
        except ValueError as exc:
            raise UsageProblem(str(exc)) from None
    state["settings"] = settings
    return settings


def _pipeline(ctx: click.Context) -> Pipeline:
    settings = _settings(ctx)
    try:
        return Pipeline(settings)
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    except TopicError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise UsageProblem(f"--data-dir {settings.data_dir}: {exc}") from None


def _import_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.argument("file", type=click.Path(dir_okay=True, allow_dash=True)),
        click.option("--segment", default=None, help="Segment for rows without segment_id."),
        click.option("--mode", type=click.Choice(MODES), default="add",
                     help="replace: each named segment becomes exactly the listed users."),
        click.option("--batch-id", default=None,
                     help="[default: from the file's checksum and the options]"),
        click.option("--format", "fmt", type=click.Choice(_FORMATS), default=None,
                     help="[default: from the file extension; needed for -]"),
        click.option("--delimiter", default=None,
                     help="CSV field separator: one character, or tab, semicolon, pipe "
                          "[default: ',' (tab for .tsv)]."),
        click.option("--max-rejects", default="1%",
                     help="Error budget: rejected rows allowed, a count or a percentage."),
        click.option("-q", "--quiet", is_flag=True, help="No progress lines."),
    ]):
        f = option(f)
    return f


def _regular_size(file: str) -> int | None:
    """The size of a regular file (the import's ETA), None for standard input or a pipe."""
    try:
        info = os.stat(file)
    except (OSError, ValueError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) and info.st_size else None


def _run_import(pipe: Pipeline, file: str, progress: Progress, **opts: Any) -> ImportResult:
    rows_read = progress.__call__
    name = "standard input" if file == "-" else file

    def input_bytes(size: int) -> None:
        if size == 0:
            rows_read(f"reading {name}: waiting for data", force=True)
        else:
            rows_read(f"reading {name}: {size / 1e6:,.1f} MB so far")

    size = _regular_size(file)

    def rows_done(rows: int) -> None:
        if progress.due():
            progress.import_rows(rows, bytes_read(file) if size else None, size)

    importer = pipe.importer(rows_done, input_bytes)
    try:
        request = pipe.import_request(file, **opts)
        return importer.run(request)
    except InputFileError as exc:
        raise click.ClickException(str(exc)) from None
    except (ImportRefused, ValueError) as exc:
        raise UsageProblem(str(exc)) from None
    except KeyboardInterrupt:
        raise Interrupted("interrupted during the import; nothing of it was published "
                          "unless it said so: run the same command again to finish the "
                          "batch") from None
    finally:
        progress.end()


def _print_import(result: ImportResult) -> None:
    if result.outcome == "duplicate":
        click.echo(f"batch {result.batch_id}: this file was already imported with these "
                   f"options ({result.rows:,} rows); nothing changed")
    elif result.outcome == "previously_failed":
        click.echo(f"batch {result.batch_id}: this file was imported before and that batch "
                   "failed; nothing changed. To import it again, give it a new --batch-id")
    elif result.outcome == "resumed":
        click.echo(f"batch {result.batch_id}: resumed an interrupted import (end markers sent)")
    elif result.outcome == "failed":
        click.echo(f"batch {result.batch_id}: failed before publishing: {result.rows:,} valid "
                   f"rows, {result.rejected:,} rejected; nothing was published")
    else:
        click.echo(f"batch {result.batch_id}: {result.outcome}, {result.rows:,} rows, "
                   f"{result.rejected:,} rejected, per partition {result.partition_counts}")
    if result.error:
        click.echo(f"error: {result.error}", err=True)


@command("import")
@_import_options
@click.pass_context
def import_(ctx: click.Context, file: str, quiet: bool, **opts: Any) -> None:
    """Publish FILE as a batch (producer only; workers process it). FILE - reads standard
    input (give --format)."""
    pipe = _pipeline(ctx)
    try:
        result = _run_import(pipe, file, _progress(ctx, quiet), **opts)
        _print_import(result)
        if result.outcome == "failed":
            sys.exit(1)
    finally:
        pipe.close()


@command()
@_import_options
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@click.pass_context
def run(ctx: click.Context, file: str, quiet: bool, timeout: float | None, **opts: Any) -> None:
    """Import FILE, process it and deliver it until the batch is closed: the import and the
    processors run here, the sinks in a child process (both cores). FILE - reads standard
    input (give --format)."""
    progress = _progress(ctx, quiet)
    pipe = _pipeline(ctx)
    try:
        try:  # before anything is published
            pipe.check_status_table()
        except ValueError as exc:
            raise UsageProblem(str(exc)) from None
        result = _run_to_the_end(ctx, pipe, file, progress, timeout, opts)
        status = pipe.batches()[result.batch_id]
        if result.outcome in ("duplicate", "previously_failed"):
            _print_import(result)
        _print_summary(status, progress.started, result)
        if status.status == "failed":
            sys.exit(1)
    finally:
        pipe.close()


def _run_to_the_end(ctx: click.Context, pipe: Pipeline, file: str, progress: Progress,
                    timeout: float | None, opts: dict[str, Any]) -> ImportResult:
    member = f"run-{os.getpid()}"
    # Started first, so that its start-up overlaps the import.
    sinks = ChildWorker(_settings(ctx), SINK_ROLES, f"{member}-sinks")
    try:
        result = _run_import(pipe, file, progress, **opts)
        if result.outcome not in ("duplicate", "previously_failed"):
            _print_import(result)
        # Always run the worker until its own batch table says finished: events of the batch
        # may still wait to be applied, or snapshots to be delivered, after a crash.
        worker = pipe.worker(PROCESSOR_ROLES, member)
        worker.install_signal_handlers()
        ops = _operations(ctx, worker, member)
        done = _batch_finished(pipe, worker, result.batch_id)

        def tick(w: Any) -> None:
            sinks.check()
            if progress.due():
                behind = {} if not progress.tty else {
                    role: sum(gp.lag for gp in pipe.log.group_positions(group_of(role)))
                    for role in SINK_ROLES}
                progress.phases(dict(w.processed), behind)

        try:
            finished = worker.run(until=lambda: sinks.check() or done(), on_tick=tick,
                                  timeout_s=timeout)
        finally:
            ops.close()
        if not finished:
            raise click.ClickException(
                f"batch {result.batch_id} is not finished (stopped or timed out); run "
                "the same command again to finish it")
        # The processors are closed (their outputs flushed): let the sinks catch up, so
        # that the last status snapshot reaches the warehouse before the summary.
        pipe.wait_for_groups(group_names(SINK_ROLES), check=sinks.check)
        return result
    except ChildWorkerDied as exc:
        raise click.ClickException(
            f"{exc}; the batch is not finished: run the same command again to finish it"
        ) from None
    finally:
        progress.end()
        sinks.stop()


def _progress(ctx: click.Context, quiet: bool) -> Progress:
    """Progress on stderr; none with --log-format json off a terminal (stderr stays JSON)."""
    _settings(ctx)  # configures the logs
    return Progress(quiet or (logs.is_json() and not sys.stderr.isatty()))


def _operations(ctx: click.Context, worker: Any, member: str) -> Operations:
    """Metrics, monitor and alerts beside a worker (streams/operations.py)."""
    settings = _settings(ctx)
    try:
        return Operations(settings, worker, lambda: Pipeline(settings),
                          member or f"{os.uname().nodename}-{os.getpid()}")
    except OSError as exc:  # the port is taken
        raise UsageProblem(f"--metrics-port {settings.metrics_port}: {exc.strerror}; "
                           "expected a free port") from None


def _batch_finished(pipe: Pipeline, worker: Any, batch_id: str) -> Callable[[], bool]:
    pipeline_task = next(t for t in worker.tasks if t.name == "pipeline")
    # The partition of the events topic that holds the batch's events (keyed by batch id).
    events = TopicPartition(EVENTS, partition_for(batch_id, len(pipe.log.partitions(EVENTS))))
    asked = [0.0]

    def done() -> bool:
        status = pipeline_task.tables("batches").get(batch_id)
        if status is not None:  # this worker folds the batch's partition: its own table
            return status.finished
        # Another member holds the batch's partition, or nobody does yet (a killed run's
        # leases wait out their failover time). The status view may already say finished
        # from events no processor has taken in: then the closing snapshot is not out
        # yet, and the warehouse's status table would stay behind. So also wait until the
        # pipeline processor's group has consumed that partition (asked at most twice a
        # second: on Kafka and Kinesis each ask reads the log).
        if time.monotonic() - asked[0] < 0.5:
            return False
        asked[0] = time.monotonic()
        view = pipe.batches().get(batch_id)
        if view is None or not view.finished:
            return False
        taken_in = [gp.lag == 0 for gp in pipe.log.group_positions(group_of("pipeline"))
                    if gp.tp == events]
        return bool(taken_in) and all(taken_in)

    return done


SUMMARY_SEGMENTS = 10


def _segment_lines(segment_ops: dict[str, tuple[int, int]]) -> list[str]:
    """A line per segment, the largest by rows first, at most SUMMARY_SEGMENTS of them: a
    file naming thousands of segments must not flood the terminal."""
    largest = sorted(segment_ops.items(), key=lambda item: (-sum(item[1]), item[0]))
    lines = [f"segment     {segment}: {adds:,} add rows, {removes:,} remove rows"
             for segment, (adds, removes) in largest[:SUMMARY_SEGMENTS]]
    if len(largest) > SUMMARY_SEGMENTS:
        lines.append(f"            ... and {len(largest) - SUMMARY_SEGMENTS:,} more segments")
    return lines


def _print_summary(status: BatchStatus, started: float, result: ImportResult) -> None:
    published = status.published_at is not None
    rows = (f"{status.rows:,} published, {status.rejected:,} rejected" if published
            else f"{status.rows:,} valid, {status.rejected:,} rejected; nothing was published")
    lines = [
        f"batch       {status.batch_id}",
        f"status      {status.status}",
        f"source      {status.source}",
        f"mode        {_MODE_WORDS.get(status.mode, status.mode)}",
        f"rows        {rows}",
    ]
    lines += _segment_lines(result.segment_ops)
    if published:
        lines += [f"partitions  {list(status.partition_counts)}",
                  f"changes     {status.changes:,} membership changes"]
    for sink, where in sorted(status.locations.items()):
        lines.append(f"output      {sink}: {where}")
    if status.closed_at:
        lines.append(f"closed at   {_ts(status.closed_at)}")
    if status.error:
        lines.append(f"error       {status.failed_step}: {status.error}")
    if status.rejected:
        lines.append(f"rejected    see: streams dead-letters {status.batch_id}")
    lines.append(f"took        {time.monotonic() - started:.2f}s")
    click.echo("\n".join(lines))


@command()
@click.option("--roles", default=",".join(ROLES),
              help=f"Comma-separated roles to run: {', '.join(ROLES)}.")
@click.option("--member", default="", help="Member id in the consumer groups.")
@click.option("-q", "--quiet", is_flag=True, help="No start and stop lines.")
@click.pass_context
def worker(ctx: click.Context, roles: str, member: str, quiet: bool) -> None:
    """Run processors and sinks until SIGTERM/SIGINT (a clean stop)."""
    chosen = tuple(r.strip() for r in roles.split(",") if r.strip())
    try:
        check_roles(chosen)
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    pipe = _pipeline(ctx)
    try:
        try:
            w = pipe.worker(chosen, member)
            w.install_signal_handlers()
            if not quiet:
                logs.echo(f"worker running {', '.join(chosen)} on {pipe.log.url}")
            ops = _operations(ctx, w, member)
            try:
                w.run()
            finally:
                ops.close()
        except ValueError as exc:
            raise UsageProblem(str(exc)) from None
        except WarehouseBusy as exc:
            raise click.ClickException(str(exc)) from None
        except RuntimeError as exc:  # the log refuses a member id that is in use
            if "already running" not in str(exc):
                raise
            raise UsageProblem(f"--member {member}: {exc}; expected a member id that no "
                               "running worker uses") from None
        if not quiet:
            logs.echo("worker stopped cleanly")
    finally:
        pipe.close()


@command()
@click.argument("batch", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True,
              help="Refresh until BATCH closes (exit 0) or fails (exit 1).")
@click.option("--interval", type=click.FloatRange(0.05), default=1.0,
              help="--watch: seconds between refreshes.")
@click.option("--timeout", type=click.FloatRange(0), default=None,
              help="--watch: give up after this many seconds (exit 1).")
@click.pass_context
def status(ctx: click.Context, batch: str | None, as_json: bool, watch: bool,
           interval: float, timeout: float | None) -> None:
    """Show the status of every batch, or of BATCH."""
    if watch:
        from streams.status_watch import watch_batch

        sys.exit(watch_batch(ctx, batch, interval, timeout))
    pipe = _pipeline(ctx)
    try:
        batches = pipe.batches()
    finally:
        pipe.close()
    chosen = [batches[batch]] if batch in batches else [] if batch else list(batches.values())
    if batch and not chosen:
        raise UsageProblem(f"no batch {batch}; known: {', '.join(sorted(batches)) or 'none'}")
    chosen.sort(key=lambda s: s.submitted_at or 0)
    spool_dir = _settings(ctx).spool_dir
    if as_json:
        out = []
        for s in chosen:
            raw = json.loads(s.to_json())
            raw["interrupted"] = _shown_status(s, spool_dir)[0] == "interrupted"
            out.append(raw)
        click.echo(json.dumps(out, indent=2))
        return
    click.echo("\n".join(status_table(chosen, spool_dir, batch)))


def status_table(chosen: list[BatchStatus], spool_dir: Any, batch: str | None) -> list[str]:
    """The lines of `streams status` (and of each refresh of `--watch`)."""
    lines = [f"{'BATCH':26} {'STATUS':11} {'ROWS':>10} {'REJECTED':>9} {'CHANGES':>10}  "
             f"{'SUBMITTED':24} {'CLOSED':24} ERROR"]
    for s in chosen:
        shown, note = _shown_status(s, spool_dir)
        lines.append(f"{s.batch_id:26} {shown:11} {s.rows:>10,} {s.rejected:>9,} "
                     f"{s.changes:>10,}  {_ts(s.submitted_at):24} {_ts(s.closed_at):24} "
                     f"{note}")
    if batch and chosen and chosen[0].rejected:
        lines.append(f"{chosen[0].rejected:,} rejected rows: see streams dead-letters {batch}")
    return lines


@command()
@click.pass_context
def topics(ctx: click.Context) -> None:
    """List topics, partitions, positions, and consumer groups with their lag."""
    pipe = _pipeline(ctx)
    try:
        from streams.shard_view import echo_shards
        from topics.spec import SPECS

        click.echo(f"{'TOPIC':30} {'PART':>4} {'MESSAGES':>9} {'FIRST':>12} {'LAST':>12}")
        for name in SPECS:
            for info in pipe.log.describe(name):
                click.echo(f"{name:30} {info.partition:>4} {info.messages:>9} "
                           f"{_pos(info.first_position):>12} {_pos(info.last_position):>12}")
        click.echo("")
        click.echo(f"{'GROUP':24} {'TOPIC':30} {'PART':>4} {'COMMITTED':>12} {'LAG':>6} OWNER")
        for group in pipe.log.groups():
            for gp in pipe.log.group_positions(group):
                click.echo(f"{group:24} {gp.tp.topic:30} {gp.tp.partition:>4} "
                           f"{_pos(gp.committed):>12} {gp.lag:>6} {gp.owner or '-'}")
        echo_shards(pipe.log, SPECS)  # Kinesis: shards, lineage, leases
    finally:
        pipe.close()


def _pos(position: int | None) -> str:
    return "-" if position is None else str(position)


@command()
@click.option("--from", "start", default="earliest",
              help="earliest, position:N, batch:ID (its first record on each partition), "
                   "or time:WHEN (ISO 8601 such as 2026-12-01T10:00:00Z, or epoch ms: each "
                   "partition from its first record appended then or later), or on "
                   "Kinesis sequence:SEQ (from that record on).")
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def replay(ctx: click.Context, start: str, quiet: bool) -> None:
    """Rewind the segments processor and the sinks, rebuild state, re-deliver outputs."""
    progress = Progress(quiet)
    pipe = _pipeline(ctx)
    try:
        try:
            report = pipe.replay(start, on_tick=lambda w: progress(", ".join(
                f"{n}: {c:,} messages" for n, c in w.processed.items())))
        except (GroupBusyError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(report)
    finally:
        pipe.close()


@command("verify")
@click.option("--batch", "batch_id", default=None,
              help="Only the segments this batch names.")
@click.option("--limit", type=int, default=50, help="Differences shown at most.")
@click.pass_context
def verify_(ctx: click.Context, batch_id: str | None, limit: int) -> None:
    """Fold audience.rows from the start and compare with the state, warehouse and S3."""
    pipe = _pipeline(ctx)
    try:
        try:
            report = pipe.verify(batch_id)
        except ValueError as exc:
            raise UsageProblem(str(exc)) from None
    finally:
        pipe.close()
    for problem in report.problems:
        click.echo(f"problem: {problem}")
    for shown, difference in enumerate(report.differences):
        if shown >= limit:
            click.echo(f"... {len(report.differences) - limit:,} more (raise --limit)")
            break
        click.echo(f"difference: {difference}")
    where = ", ".join(report.compared)
    if report.ok:
        click.echo(f"verified: {report.expected:,} members; no differences in {where}")
        return
    click.echo(f"{len(report.differences):,} differences, {len(report.problems)} problems "
               f"(compared {report.expected:,} members with {where})")
    sys.exit(1)


@command("dead-letters")
@click.argument("batch", required=False)
@click.option("--limit", type=int, default=50)
@click.pass_context
def dead_letters(ctx: click.Context, batch: str | None, limit: int) -> None:
    """Show rejected rows (file, record number, reason with the line, raw row)."""
    pipe = _pipeline(ctx)
    try:
        if batch is not None:
            batches = pipe.batches()
            if batch not in batches:
                raise UsageProblem(
                    f"no batch {batch}; known: {', '.join(sorted(batches)) or 'none'}")
        for shown, row in enumerate(pipe.dead_letters(batch)):
            if shown >= limit:
                click.echo("... (more; raise --limit)")
                break
            raw = row["raw"] if len(row["raw"]) <= 120 else row["raw"][:120] + "..."
            line = f" (line {row['line']})" if row["line"] else ""
            click.echo(f"{row['batch_id']} {row['file']}:{row['row']}: {row['reason']}{line}"
                       + (f" | raw: {raw}" if raw else ""))
    finally:
        pipe.close()


# Commands kept in modules of their own, registered on the group here.
from streams.status_page import register as _register_serve  # noqa: E402

_register_serve()


def main() -> None:
    cli(prog_name="streams")
