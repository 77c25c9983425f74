"""`streams serve`: a small read-only web page over the state `streams status` reads.

    /                    every batch (status, counts, rejected rows, per-step times, errors)
                         and the freshness of each segment (time since its last close)
    /batches/ID          one batch: per-partition progress and its dead letters
    /api/batches         the batches as JSON (as `streams status --json`)
    /api/batches/ID      one batch as JSON, with its partitions and dead letters

The standard library's ThreadingHTTPServer serves it: a handful of GET routes that each
read the batch table, no sessions, no forms, no scripts; a framework (aiohttp, an ASGI
stack) would add an event loop and dependencies for nothing this page does. It binds to
127.0.0.1 unless told otherwise, answers every other method with 405 (it changes
nothing), and escapes everything it shows (file names, ids and errors come from users);
pages refresh themselves (a meta refresh, no JavaScript) while a batch they show is open.
"""

from __future__ import annotations

import html
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import click

from processors.pipeline_state import BatchStatus
from streams import batch_view, logs
from streams.batch_view import age, ts
from streams.logs import redact

DEAD_LETTERS_SHOWN = 200
REFRESH_S = 2
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'"
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.status{font-weight:600;padding:.1em .4em;border-radius:3px}
.closed{background:#d9f2d9}.failed{background:#f8d0d0}.published,.submitted{background:#fff1c2}
.interrupted{background:#e5e5e5}.error{color:#a00;white-space:pre-wrap}
.yes{color:#070}.no{color:#a60}code{font-size:13px}
td.id,td.t{white-space:nowrap}td.error{min-width:18em;max-width:40em}
"""


def e(value: Any) -> str:
    """Escaped text for HTML (every value shown passes through here)."""
    return html.escape(redact(str(value)), quote=True)


class StateReader:
    """One Pipeline shared by the server's threads, read under a lock (a log handle is not
    meant for concurrent use)."""

    def __init__(self, open_pipeline: Callable[[], Any], spool_dir: Path):
        self._pipe = open_pipeline()
        self._lock = threading.Lock()
        self.spool_dir = spool_dir

    def batches(self) -> dict[str, BatchStatus]:
        with self._lock:
            return self._pipe.batches()

    def dead_letters(self, batch_id: str, limit: int = DEAD_LETTERS_SHOWN) -> list[dict[str,
                                                                                       Any]]:
        with self._lock:
            return list(islice(self._pipe.dead_letters(batch_id), limit))

    def close(self) -> None:
        with self._lock:
            self._pipe.close()


# -- pages -------------------------------------------------------------------------------
def _page(title: str, body: str, refresh: bool) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if refresh else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}'
            f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>{body}"
            "</body></html>")


def _status_cell(shown: str) -> str:
    return f'<span class="status {e(shown)}" data-status="{e(shown)}">{e(shown)}</span>'


def _when(ms: int | None) -> str:
    """A time cell: month-day and time shown (UTC), the full stamp as its title."""
    short = ts(ms)[5:19] if ms is not None else "-"
    return f'<td class="t" title="{e(ts(ms))}">{e(short)}</td>'


def index_page(reader: StateReader) -> str:
    batches = sorted(reader.batches().values(), key=lambda s: -(s.submitted_at or 0))
    rows = []
    for s in batches:
        shown, note = batch_view.shown_status(s, reader.spool_dir)
        rows.append(
            f'<tr data-batch="{e(s.batch_id)}"><td class="id"><a href="/batches/'
            f'{quote(s.batch_id)}">{e(s.batch_id)}</a></td><td>{_status_cell(shown)}</td>'
            f'<td title="{e(s.source)}">{e(Path(s.source).name or s.source)}</td>'
            f"<td>{e(s.mode)}</td><td>{e(', '.join(s.segments))}</td>"
            f'<td class="n">{s.rows:,}</td><td class="n rejected">{s.rejected:,}</td>'
            f'<td class="n">{s.changes:,}</td>{_when(s.submitted_at)}{_when(s.published_at)}'
            f"{_when(s.applied_at)}{_when(s.closed_at or s.failed_at)}"
            f'<td class="error">{e(f"{s.failed_step}: {note}" if s.failed_step else note)}'
            "</td></tr>")
    fresh = "".join(
        f'<tr data-segment="{e(r["segment"])}"><td>{e(r["segment"])}</td>'
        f'<td><a href="/batches/{quote(r["batch_id"])}">{e(r["batch_id"])}</a></td>'
        f'<td>{e(ts(r["closed_at"]))}</td><td class="n">{e(age(r["closed_at"]))} ago</td></tr>'
        for r in batch_view.freshness(batches))
    open_ = any(not s.finished for s in batches)
    body = (
        "<h1>Batches</h1>"
        f'<p id="summary">{len(batches)} batches, '
        f"{sum(1 for s in batches if not s.finished)} open"
        f"{f'; refreshing every {REFRESH_S}s' if open_ else ''}</p>"
        '<table id="batches"><tr><th>batch</th><th>status</th><th>source</th><th>mode</th>'
        "<th>segments</th><th>rows</th><th>rejected</th><th>changes</th><th>submitted</th>"
        "<th>published</th><th>applied</th><th>closed / failed</th><th>error</th></tr>"
        + "".join(rows) + "</table>"
        '<h2>Freshness</h2><table id="freshness"><tr><th>segment</th><th>last closed batch'
        "</th><th>closed</th><th>age</th></tr>" + fresh + "</table>")
    return _page("streams: batches", body, open_)


def batch_page(reader: StateReader, s: BatchStatus) -> str:
    shown, note = batch_view.shown_status(s, reader.spool_dir)
    facts = [("status", _status_cell(shown)), ("source", e(s.source)), ("mode", e(s.mode)),
             ("segments", e(", ".join(s.segments))), ("rows", f"{s.rows:,}"),
             ("rejected", f'<span id="rejected">{s.rejected:,}</span>'),
             ("changes", f"{s.changes:,}"), ("submitted", e(ts(s.submitted_at))),
             ("published", e(ts(s.published_at))), ("applied", e(ts(s.applied_at))),
             ("closed", e(ts(s.closed_at))), ("failed", e(ts(s.failed_at)))]
    if s.failed_step or note:
        facts.append(("error", f'<span class="error" id="error">'
                               f"{e(s.failed_step + ': ' if s.failed_step else '')}{e(note)}"
                               "</span>"))
    for sink, where in sorted(s.locations.items()):
        facts.append((f"output {e(sink)}", f"<code>{e(where)}</code>"))
    head = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    sinks = list(s.sinks)
    parts = "".join(
        f'<tr data-partition="{p["partition"]}"><td class="n">{p["partition"]}</td>'
        f'<td class="n">{p["rows"]:,}</td>'
        + (f'<td class="n yes">{p["applied"]:,}</td>' if p["applied"] is not None
           else '<td class="no">waiting</td>')
        + "".join(f'<td class="{"yes" if p["sinks"][k] else "no"}">'
                  f'{"committed" if p["sinks"][k] else "waiting"}</td>' for k in sinks)
        + "</tr>" for p in batch_view.partitions(s))
    dead = reader.dead_letters(s.batch_id)
    dead_rows = "".join(
        f'<tr class="dead-letter"><td>{e(d.get("file", ""))}</td><td class="n">'
        f'{e(d.get("row", ""))}</td><td>{e(d.get("reason", ""))}</td>'
        f'<td><code>{e(d.get("raw", ""))}</code></td></tr>' for d in dead)
    more = (f"<p>showing the first {DEAD_LETTERS_SHOWN}: <code>streams dead-letters "
            f"{e(s.batch_id)}</code> lists them all</p>" if len(dead) >= DEAD_LETTERS_SHOWN
            else "")
    body = (
        f'<p><a href="/">all batches</a></p><h1>Batch <span id="batch-id">{e(s.batch_id)}'
        f"</span></h1><table id=\"facts\">{head}</table>"
        "<h2>Partitions</h2><table id=\"partitions\"><tr><th>partition</th><th>rows</th>"
        "<th>changes applied</th>" + "".join(f"<th>{e(k)}</th>" for k in sinks) + "</tr>"
        + parts + "</table>"
        f'<h2>Dead letters ({len(dead):,}{"+" if more else ""})</h2>'
        '<table id="dead-letters"><tr><th>file</th><th>record</th><th>reason</th><th>raw</th>'
        "</tr>" + dead_rows + "</table>" + more)
    return _page(f"streams: batch {s.batch_id}", body, not s.finished)


# -- JSON --------------------------------------------------------------------------------
def api_batches(reader: StateReader) -> list[dict[str, Any]]:
    batches = sorted(reader.batches().values(), key=lambda s: s.submitted_at or 0)
    return [batch_view.as_dict(s, reader.spool_dir) for s in batches]


def api_batch(reader: StateReader, s: BatchStatus) -> dict[str, Any]:
    return {**batch_view.as_dict(s, reader.spool_dir),
            "partition_progress": batch_view.partitions(s),
            "dead_letters": reader.dead_letters(s.batch_id)}


# -- the server --------------------------------------------------------------------------
class StatusServer:
    def __init__(self, reader: StateReader, host: str = "127.0.0.1", port: int = 8080):
        self.reader = reader
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer._get(self)

            def _refuse(self) -> None:
                outer._send(self, 405, "text/plain; charset=utf-8",
                            b"read-only: GET only\n", {"Allow": "GET"})

            do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.host, self.port = host, self.server.server_address[1]

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            self._route(h, path)
        except Exception as exc:  # a read that failed: the page says so, the server lives
            self._send(h, 500, "text/plain; charset=utf-8",
                       redact(f"could not read the state: {type(exc).__name__}: {exc}\n")
                       .encode())

    def _route(self, h: BaseHTTPRequestHandler, path: str) -> None:
        html_type, json_type = "text/html; charset=utf-8", "application/json"
        if path == "/":
            self._send(h, 200, html_type, index_page(self.reader).encode())
        elif path == "/api/batches":
            self._send(h, 200, json_type, _json(api_batches(self.reader)))
        elif path.startswith(("/batches/", "/api/batches/")):
            batch_id = unquote(path.rsplit("/", 1)[1])
            status = self.reader.batches().get(batch_id)
            api = path.startswith("/api/")
            if status is None:
                self._send(h, 404, json_type if api else html_type,
                           _json({"error": f"no batch {batch_id}"}) if api else _page(
                               "not found", f"<h1>No batch {e(batch_id)}</h1>"
                               '<p><a href="/">all batches</a></p>', False).encode())
            elif api:
                self._send(h, 200, json_type, _json(api_batch(self.reader, status)))
            else:
                self._send(h, 200, html_type, batch_page(self.reader, status).encode())
        elif path == "/healthz":
            self._send(h, 200, "text/plain; charset=utf-8", b"ok\n")
        else:
            self._send(h, 404, "text/plain; charset=utf-8",
                       b"not found: /, /batches/ID, /api/batches, /api/batches/ID\n")

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, kind: str, body: bytes,
              headers: dict[str, str] | None = None) -> None:
        h.send_response(code)
        for name, value in {"Content-Type": kind, "Content-Length": str(len(body)),
                            "Content-Security-Policy": _CSP, "X-Content-Type-Options":
                            "nosniff", "Cache-Control": "no-store", **(headers or {})}.items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(body)

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def close(self) -> None:
        self.server.server_close()
        self.reader.close()


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=2, default=str).encode()


# -- the command -------------------------------------------------------------------------
def register() -> None:
    from streams.cli import UsageProblem, _pipeline, _settings, command

    @command("serve")
    @click.option("--port", type=click.IntRange(0, 65535), default=8080,
                  help="Port of the page (0: any free one, printed).")
    @click.option("--host", default="127.0.0.1",
                  help="Address to bind; 0.0.0.0 exposes the page to the network.")
    @click.pass_context
    def serve(ctx: click.Context, port: int, host: str) -> None:
        """Serve a read-only status page (and /api/batches) over the batch table."""
        settings = _settings(ctx)
        try:
            server = StatusServer(StateReader(lambda: _pipeline(ctx), settings.spool_dir),
                                  host, port)
        except OSError as exc:
            raise UsageProblem(f"--port {port}: {exc.strerror}; expected a free port") \
                from None
        logs.echo(f"serving http://{server.host}:{server.port}/ (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.close()
