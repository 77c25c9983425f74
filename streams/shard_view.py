"""`streams topics` on Kinesis: the shards under the virtual partitions, with their lineage
and hash ranges, and each group's leases (owner, lag of the checkpoint in milliseconds:
GetRecords' MillisBehindLatest, checkpoint). Other backends have no shards:
nothing is printed for them."""

from __future__ import annotations

from collections.abc import Iterable

import click

from topics.log import Log


def echo_shards(log: Log, topics: Iterable[str]) -> None:
    view = getattr(log, "shard_view", None)
    if view is None:
        return
    groups = log.groups()
    click.echo("")
    click.echo(f"{'TOPIC':30} {'SHARD':20} {'STATE':6} {'PARENTS':41} HASH KEYS")
    leases = []
    for topic in topics:
        for row in view(topic):
            parents = ",".join(row["parents"]) or "-"
            start, end = row["hash_range"]
            click.echo(f"{topic:30} {row['shard']:20} "
                       f"{'closed' if row['closed'] else 'open':6} {parents:41} {start}-{end}")
        for group in groups:
            leases.extend((group, topic, row) for row in view(topic, group)
                          if row["checkpoint"] is not None)
    if leases:
        click.echo("")
        click.echo(f"{'GROUP':24} {'TOPIC':30} {'SHARD':20} {'OWNER':24} {'LAG MS':>8} "
                   "CHECKPOINT")
        for group, topic, row in leases:
            behind = row["millis_behind"]
            click.echo(f"{group:24} {topic:30} {row['shard']:20} {row['owner'] or '-':24} "
                       f"{'-' if behind is None else behind:>8} {row['checkpoint']}")
