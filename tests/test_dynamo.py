"""DynamoDB on a real API (moto's server): the batch status mirror (`--status-table`),
conditional on event positions, and the triggers' double-fire guard."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors import aws
from connectors.dynamo import claim_object, ensure_guard_table
from connectors.dynamo_status import DynamoStatusSink, StatusTable
from tests.aws_server import aws_env, moto_endpoint, unique_name
from tests.support import run_cli, write_csv
from topics.positions import key

__all__ = ["aws_env", "moto_endpoint"]  # fixtures, used by name


def _status(batch: str, status: str, **more: object) -> dict[str, object]:
    return {"batch_id": batch, "status": status, "rows": 10, "rejected": 1, "partitions": 2,
            "partition_counts": [4, 6], "applied": {"0": 3, "1": 5}, "submitted_at": 1000,
            "closed_at": None, "error": "", "segments": ["s1"], **more}


def test_status_items_never_move_backwards(aws_env: dict[str, str]) -> None:
    table = StatusTable(unique_name("status"))  # created on first use
    assert table.put(_status("b1", "submitted"), 5, "{}")
    assert table.put(_status("b1", "closed", closed_at=2000), 9, "{}")
    # A snapshot re-read after a crash (same position), a zombie's older one: no change.
    assert not table.put(_status("b1", "closed", closed_at=2000), 9, "{}")
    assert not table.put(_status("b1", "published"), 7, "{}")
    item = table.get("b1")
    assert item is not None
    assert (item["status"], item["closed_at"], item["source_position"]) == ("closed", 2000, 9)
    assert (item["rows"], item["rejected"], item["changes"]) == (10, 1, 8)
    assert item["partition_counts"] == [4, 6]
    assert StatusTable(table.name).get("b1") == item  # an existing table is used as it is


# The fixture only sets the environment: the same for every example.
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(positions=st.lists(st.integers(0, 50), min_size=1, max_size=8))
def test_item_holds_the_highest_position_in_any_order(aws_env: dict[str, str],
                                                      positions: list[int]) -> None:
    table = StatusTable(_shared_table())
    batch = unique_name("b")
    for p in positions:
        table.put(_status(batch, f"at-{p}"), p, "{}")
    item = table.get(batch)
    assert item is not None and item["status"] == f"at-{max(positions)}"


_TABLES: list[str] = []


def test_wide_positions_and_items_written_before_them(aws_env: dict[str, str]) -> None:
    """A Kinesis position is far wider than a DynamoDB number: items keep its key
    (`source_key`, compared as a string) and the number only when it fits. An item of an
    older writer has only the number."""
    table = StatusTable(unique_name("status"))
    old = {"batch_id": {"S": "b"}, "status": {"S": "old"}, "source_position": {"N": "9"}}
    table.client.put_item(TableName=table.name, Item=old)
    assert not table.put(_status("b", "at-7"), 7, "{}")  # below the old item's number
    assert table.put(_status("b", "at-12"), 12, "{}")
    item = table.get("b")
    assert item is not None
    assert (item["source_position"], item["source_key"]) == (12, f"{12:020d}")
    wide = 10**128 * 5 + 3  # a 129-digit position
    assert table.put(_status("b", "wide"), wide, "{}")
    assert not table.put(_status("b", "at-13"), 13, "{}")
    assert not table.put(_status("b", "wide again"), wide, "{}")
    assert not table.put(_status("b", "below"), wide - 1, "{}")
    assert table.put(_status("b", "wider"), wide * 10, "{}")
    item = table.get("b")
    assert item is not None and item["status"] == "wider"
    assert "source_position" not in item and item["source_key"] == key(wide * 10)
    # An older item, then at once a wide position: the wide one is above it.
    table.client.put_item(TableName=table.name, Item={**old, "batch_id": {"S": "c"}})
    assert table.put(_status("c", "wide"), wide, "{}")


def _shared_table() -> str:
    if not _TABLES:
        _TABLES.append(unique_name("status"))
    return _TABLES[0]


def test_sink_applies_snapshots_by_position(aws_env: dict[str, str]) -> None:
    sink = DynamoStatusSink(StatusTable(unique_name("status")))

    def record(status: str, position: int) -> SimpleNamespace:
        detail = json.dumps(_status("b2", status))
        return SimpleNamespace(value={"json": detail, "source_position": position})

    for status, position in [("submitted", 1), ("closed", 8), ("published", 4)]:
        assert sink.process(record(status, position)) == []  # type: ignore[arg-type]
    item = sink.table.get("b2")
    assert item is not None and item["status"] == "closed"
    assert json.loads(item["detail"])["status"] == "closed"


def test_a_table_with_another_key_is_refused(aws_env: dict[str, str], tmp_path: Path) -> None:
    name = unique_name("other")
    aws.client("dynamodb").create_table(
        TableName=name, BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}])
    with pytest.raises(ValueError, match=f"--status-table {name}: the DynamoDB table exists "
                                         r"with key id \(hash, S\); expected batch_id"):
        StatusTable(name)
    proc = run_cli("worker", "--roles", "status-table", "--status-table", name,
                   data_dir=tmp_path / "d", env=aws_env, check=False, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"Error: --status-table {name}: the DynamoDB table exists with key id")


@pytest.mark.parametrize("problem", ["another key schema", "no AWS credentials"])
def test_run_with_an_unusable_status_table_fails_before_publishing(
        aws_env: dict[str, str], tmp_path: Path, problem: str) -> None:
    """Regression: `streams run` found a table with the wrong key schema only in its sinks'
    child worker, after the import had published the batch (and a process without AWS
    credentials failed there with a traceback). It is checked up front now: one line naming
    the table and what was expected, nothing published."""
    name = unique_name("other")
    env = dict(aws_env)
    if problem == "another key schema":
        aws.client("dynamodb").create_table(
            TableName=name, BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}])
        expected = (f"Error: --status-table {name}: the DynamoDB table exists with key id "
                    "(hash, S); expected batch_id (hash, S) as its only key: choose another "
                    "table name or delete that table")
    else:
        env.update(AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="", AWS_SESSION_TOKEN="")
        expected = (f"Error: --status-table {name}: cannot use the DynamoDB table (no AWS "
                    "credentials found); expected one this process's AWS credentials may "
                    "describe, create and write to")
    path = write_csv(tmp_path / "in.csv", [(f"u{i}", "s1", "add") for i in range(20)])
    data = tmp_path / "d"
    proc = run_cli("run", str(path), "-q", "--status-table", name, data_dir=data, env=env,
                   check=False, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [expected]
    assert proc.stdout == ""
    assert json.loads(run_cli("status", "--json", data_dir=data, env=aws_env).stdout) == []
    from topics.backends.embedded.log import EmbeddedLog
    from topics.spec import EVENTS, ROWS

    log = EmbeddedLog(data / "log")
    try:
        assert sum(info.messages for topic in (ROWS, EVENTS) for info in log.describe(topic)) \
            == 0, "the run published before it checked its status table"
    finally:
        log.close()


def test_double_fire_guard(aws_env: dict[str, str]) -> None:
    table = unique_name("guard")
    ensure_guard_table(table)
    assert claim_object(table, "bkt", "in/a.csv", "v1", batch_id="b-1")
    assert not claim_object(table, "bkt", "in/a.csv", "v1", batch_id="b-1")  # double fire
    assert claim_object(table, "bkt", "in/a.csv", "v2")  # a new version is a new file
    assert claim_object(table, "bkt", "in/b.csv", "v1")


def test_run_mirrors_the_batch_into_the_table(aws_env: dict[str, str], tmp_path: Path) -> None:
    name = unique_name("status")
    rows = [(f"u{i}", "s1", "add") for i in range(50)] + [("", "s1", "add")]
    path = write_csv(tmp_path / "in.csv", rows)
    run_cli("run", str(path), "-q", "--status-table", name, "--max-rejects", "5",
            data_dir=tmp_path / "d", env=aws_env)
    status = json.loads(run_cli("status", "--json", data_dir=tmp_path / "d",
                                env=aws_env).stdout)[0]
    item = StatusTable(name).get(status["batch_id"])
    assert item is not None
    assert (item["status"], item["rows"], item["rejected"], item["changes"]) == (
        "closed", 50, 1, 50)
    for step in ("submitted_at", "published_at", "closed_at"):
        assert item[step] == status[step]
    assert json.loads(item["detail"])["closed_at"] == status["closed_at"]


def test_the_state_machine_records_survive_the_mirror(aws_env: dict[str, str]) -> None:
    """The trigger writes a batch's item before the pipeline has seen it, and its steps
    beside the pipeline's status: the mirror's writes (UpdateItem of its own attributes)
    replace the trigger's `submitted` and keep every `step_*` (a whole-item put lost them)."""
    table = StatusTable(unique_name("status"))
    assert table.submit("b1", "s3://in/k.csv", 500, {"phase": "ended", "at": 500})
    assert not table.submit("b1", "s3://in/k.csv", 600, {"phase": "ended", "at": 600})
    assert table.put(_status("b1", "published"), 0, "{}")  # position 0 is above the -1
    table.record_step("b1", "import", {"phase": "failed", "at": 700, "error": "boom"})
    assert table.put(_status("b1", "closed", closed_at=2000), 9, "{}")
    item = table.get("b1")
    assert item is not None
    assert (item["status"], item["source_position"], item["closed_at"]) == ("closed", 9, 2000)
    assert item["step_submit"] == {"phase": "ended", "at": 600}  # the retry's record
    assert item["step_import"]["error"] == "boom"
    assert (item["execution_failed_step"], item["execution_error"]) == ("import", "boom")
    # A submit after the mirror wrote changes none of the mirror's attributes.
    assert not table.submit("b1", "s3://in/other.csv", 800, {"phase": "ended", "at": 800})
    item = table.get("b1")
    assert item is not None and (item["status"], item["source"]) != ("submitted",
                                                                     "s3://in/other.csv")
