"""The `streams` command line. Every option is also an environment variable (STREAMS_ +
the option name, e.g. STREAMS_DATA_DIR) and a key of the config file (`streams.toml`, or
--config / STREAMS_CONFIG), with flags first, then variables, then the file."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from connectors.importer import ImportRefused, ImportResult
from connectors.rows import MODES, InputFileError
from processors.pipeline_state import BatchStatus
from streams.child_worker import ChildWorker, ChildWorkerDied
from streams.pipeline import PROCESSOR_ROLES, ROLES, SINK_ROLES, Pipeline, group_names
from streams.settings import Settings, load_config_file
from topics.log import GroupBusyError, TopicError


def _settings(ctx: click.Context) -> Settings:
    return ctx.find_root().obj


def _config_default_map(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    try:
        config = load_config_file(value)
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from None
    commands = ("run", "import", "worker", "status", "replay", "topics", "dead-letters",
                "verify")
    ctx.default_map = {**config, **{c: config for c in commands}}


@click.group(context_settings={"auto_envvar_prefix": "STREAMS", "show_default": True})
@click.option("--config", callback=_config_default_map, is_eager=True, expose_value=False,
              help="TOML config file (default: ./streams.toml if present).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=".streams",
              help="Where the embedded log, the local object store and the warehouse live.")
@click.option("--backend", type=click.Choice(["embedded", "kafka"]), default="embedded")
@click.option("--bootstrap", default="", help="Kafka bootstrap servers, host:port[,...].")
@click.option("--s3-format", type=click.Choice(["parquet", "avro", "jsonl"]), default="parquet",
              help="Format of the objects the S3 sink writes.")
@click.option("--s3-root", type=click.Path(file_okay=False), default=None,
              help="Local object store root [default: DATA_DIR/s3].")
@click.option("--warehouse", type=click.Path(dir_okay=False), default=None,
              help="DuckDB file [default: DATA_DIR/warehouse.duckdb].")
@click.option("--warehouse-threads", type=click.IntRange(1), default=1,
              help="DuckDB threads of the warehouse sink: its merges are per (batch, "
              "partition) and leave the other cores to the processors.")
@click.option("--warehouse-memory-limit", default="",
              help="DuckDB memory_limit, e.g. 256MB [default: DuckDB's, 80% of RAM].")
@click.option("--s3-prefix", default="audience/segment-changes",
              help="Key prefix of the S3 sink's objects.")
@click.option("--message-rows", type=click.IntRange(1, 100_000), default=5000,
              help="Rows packed into one message on the rows topic.")
@click.option("--chunk-rows", type=click.IntRange(1), default=100_000,
              help="Rows per object the S3 sink writes (and per warehouse staging load).")
@click.option("--checkpoint-interval-s", type=click.FloatRange(0.01), default=1.0,
              help="Longest time between processor checkpoints.")
@click.option("--kafka-option", multiple=True, metavar="KEY=VALUE",
              help="A kafka-python client setting (repeatable), e.g. linger.ms=5.")
@click.option("--kafka-session-timeout-ms", type=int, default=None,
              help="Consumer group session timeout [default: Kafka's].")
@click.option("--kafka-heartbeat-interval-ms", type=int, default=None,
              help="Consumer group heartbeat interval [default: Kafka's].")
@click.option("--kafka-max-poll-interval-ms", type=int, default=None,
              help="Longest time between polls before a member is dropped [default: Kafka's].")
@click.option("--kafka-replication-factor", type=int, default=1,
              help="Replication factor of topics the pipeline creates.")
@click.option("--kafka-max-request-size", type=int, default=1 << 20,
              help="Largest message the producer sends: rows are packed under it, a row "
              "too big on its own is dead-lettered.")
@click.option("--fsync/--no-fsync", default=False,
              help="fsync the embedded log on every flush (survives power loss, slower).")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: int, **options: Any) -> None:
    """Import audience files into segments, deliver them to S3 and a warehouse."""
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Settings.build(options)


def _pipeline(ctx: click.Context) -> Pipeline:
    try:
        return Pipeline(_settings(ctx))
    except (TopicError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def _import_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.argument("file", type=click.Path(dir_okay=True)),
        click.option("--segment", default=None, help="Segment for rows without segment_id."),
        click.option("--mode", type=click.Choice(MODES), default="add",
                     help="replace: each named segment becomes exactly the listed users."),
        click.option("--batch-id", default=None, help="[default: from the file's checksum]"),
        click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet"]),
                     default=None, help="[default: from the file extension]"),
        click.option("--max-rejects", default="1%",
                     help="Error budget: rejected rows allowed, a count or a percentage."),
        click.option("-q", "--quiet", is_flag=True, help="No progress lines."),
    ]):
        f = option(f)
    return f


class Progress:
    """Progress lines on stderr, at most one a second."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.started = time.monotonic()
        self._last = 0.0

    def __call__(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.quiet or (not force and now - self._last < 1.0):
            return
        self._last = now
        click.echo(f"[{now - self.started:6.1f}s] {text}", err=True)


def _run_import(pipe: Pipeline, file: str, progress: Progress, **opts: Any) -> ImportResult:
    rows_read = progress.__call__
    importer = pipe.importer(lambda n: rows_read(f"import: {n:,} rows read"))
    try:
        request = pipe.import_request(file, **opts)
        return importer.run(request)
    except (InputFileError, ImportRefused, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def _print_import(result: ImportResult) -> None:
    if result.outcome == "duplicate":
        click.echo(f"batch {result.batch_id}: this file was already imported "
                   f"({result.rows:,} rows); nothing changed")
    elif result.outcome == "previously_failed":
        click.echo(f"batch {result.batch_id}: this file was imported before and that batch "
                   "failed; nothing changed. To import it again, give it a new --batch-id")
    elif result.outcome == "resumed":
        click.echo(f"batch {result.batch_id}: resumed an interrupted import (end markers sent)")
    else:
        click.echo(f"batch {result.batch_id}: {result.outcome}, {result.rows:,} rows, "
                   f"{result.rejected:,} rejected, per partition {result.partition_counts}")
    if result.error:
        click.echo(f"error: {result.error}", err=True)


@cli.command("import")
@_import_options
@click.pass_context
def import_(ctx: click.Context, file: str, quiet: bool, **opts: Any) -> None:
    """Publish FILE as a batch (producer only; workers process it)."""
    pipe = _pipeline(ctx)
    try:
        result = _run_import(pipe, file, Progress(quiet), **opts)
        _print_import(result)
        if result.outcome == "failed":
            sys.exit(1)
    finally:
        pipe.close()


@cli.command()
@_import_options
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@click.pass_context
def run(ctx: click.Context, file: str, quiet: bool, timeout: float | None, **opts: Any) -> None:
    """Import FILE, process it and deliver it until the batch is closed: the import and the
    processors run here, the sinks in a child process (both cores)."""
    progress = Progress(quiet)
    pipe = _pipeline(ctx)
    try:
        result = _run_to_the_end(ctx, pipe, file, progress, timeout, opts)
        status = pipe.batches()[result.batch_id]
        if result.outcome in ("duplicate", "previously_failed"):
            _print_import(result)
        _print_summary(status, progress.started)
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
        done = _batch_finished(pipe, worker, result.batch_id)

        def tick(w: Any) -> None:
            sinks.check()
            progress(", ".join(f"{name}: {n:,} messages" for name, n in w.processed.items()))

        if not worker.run(until=lambda: sinks.check() or done(), on_tick=tick,
                          timeout_s=timeout):
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
        sinks.stop()


def _batch_finished(pipe: Pipeline, worker: Any, batch_id: str) -> Callable[[], bool]:
    pipeline_task = next(t for t in worker.tasks if t.name == "pipeline")

    def done() -> bool:
        status = pipeline_task.tables("batches").get(batch_id)
        if status is None and not pipeline_task.stores:
            status = pipe.batches().get(batch_id)  # another worker owns that partition
        return status is not None and status.finished

    return done


def _ts(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _print_summary(status: BatchStatus, started: float) -> None:
    lines = [
        f"batch       {status.batch_id}",
        f"status      {status.status}",
        f"source      {status.source} ({status.mode})",
        f"rows        {status.rows:,} published, {status.rejected:,} rejected",
        f"partitions  {list(status.partition_counts)}",
        f"changes     {status.changes:,} membership changes",
    ]
    for sink, where in sorted(status.locations.items()):
        lines.append(f"output      {sink}: {where}")
    if status.closed_at:
        lines.append(f"closed at   {_ts(status.closed_at)}")
    if status.error:
        lines.append(f"error       {status.failed_step}: {status.error}")
    lines.append(f"took        {time.monotonic() - started:.2f}s")
    click.echo("\n".join(lines))


@cli.command()
@click.option("--roles", default=",".join(ROLES),
              help=f"Comma-separated roles to run: {', '.join(ROLES)}.")
@click.option("--member", default="", help="Member id in the consumer groups.")
@click.option("-q", "--quiet", is_flag=True, help="No start and stop lines.")
@click.pass_context
def worker(ctx: click.Context, roles: str, member: str, quiet: bool) -> None:
    """Run processors and sinks until SIGTERM/SIGINT (a clean stop)."""
    pipe = _pipeline(ctx)
    try:
        chosen = tuple(r.strip() for r in roles.split(",") if r.strip())
        try:
            w = pipe.worker(chosen, member)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        w.install_signal_handlers()
        if not quiet:
            click.echo(f"worker running {', '.join(chosen)} on {pipe.log.url}", err=True)
        w.run()
        if not quiet:
            click.echo("worker stopped cleanly", err=True)
    finally:
        pipe.close()


@cli.command()
@click.argument("batch", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, batch: str | None, as_json: bool) -> None:
    """Show the status of every batch, or of BATCH."""
    pipe = _pipeline(ctx)
    try:
        batches = pipe.batches()
    finally:
        pipe.close()
    chosen = [batches[batch]] if batch in batches else [] if batch else list(batches.values())
    if batch and not chosen:
        raise click.ClickException(f"no batch {batch}; known: {', '.join(sorted(batches))}")
    chosen.sort(key=lambda s: s.submitted_at or 0)
    if as_json:
        click.echo(json.dumps([json.loads(s.to_json()) for s in chosen], indent=2))
        return
    header = f"{'BATCH':26} {'STATUS':10} {'ROWS':>10} {'REJECTED':>9} {'CHANGES':>10}  " \
             f"{'SUBMITTED':24} {'CLOSED':24} ERROR"
    click.echo(header)
    for s in chosen:
        click.echo(f"{s.batch_id:26} {s.status:10} {s.rows:>10,} {s.rejected:>9,} "
                   f"{s.changes:>10,}  {_ts(s.submitted_at):24} {_ts(s.closed_at):24} "
                   f"{s.error}")


@cli.command()
@click.pass_context
def topics(ctx: click.Context) -> None:
    """List topics, partitions, positions, and consumer groups with their lag."""
    pipe = _pipeline(ctx)
    try:
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
    finally:
        pipe.close()


def _pos(position: int | None) -> str:
    return "-" if position is None else str(position)


@cli.command()
@click.option("--from", "start", default="earliest",
              help="earliest, position:N, or batch:ID (its first record on each partition).")
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


@cli.command("verify")
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
            raise click.ClickException(str(exc)) from None
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


@cli.command("dead-letters")
@click.argument("batch", required=False)
@click.option("--limit", type=int, default=50)
@click.pass_context
def dead_letters(ctx: click.Context, batch: str | None, limit: int) -> None:
    """Show rejected rows (file, row, reason) from the dead-letter topic."""
    pipe = _pipeline(ctx)
    try:
        for shown, row in enumerate(pipe.dead_letters(batch)):
            if shown >= limit:
                click.echo("... (more; raise --limit)")
                break
            click.echo(f"{row['batch_id']} {row['file']}:{row['row']}: {row['reason']}")
    finally:
        pipe.close()


def main() -> None:
    cli(prog_name="streams")
