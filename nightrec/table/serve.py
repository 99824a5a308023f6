"""``nightrec serve``: a read-only HTTP endpoint over the published recommendations.

    GET  /recommendations/<user_id>?k=10   one user's top k, as JSON
    GET  /healthz                          which table is loaded (503 until one is published)
    GET  /metrics                          Prometheus text format (prometheus-client)
    HEAD on all three; any other method gets 405.

    python -m nightrec.table.serve [--host 127.0.0.1] [--port 8090] [--ds YYYY-MM-DD]
        [--bucket B] [--poll-interval-s S] [--unknown-user 404|popular] [--id-pattern RE2] ...

Configuration: ``nightrec serve`` (the full install) loads params.yaml (its ``serve`` group and
clean's id rule) and passes it in; this module reads no file, so a reader-only install runs it
with flags, ``NIGHTREC_SERVE_<FIELD>`` variables (``NIGHTREC_SERVE_PORT``,
``NIGHTREC_SERVE_UNKNOWN_USER``, ...) and ServeConfig's defaults, which are params.yaml's. The
store: ``S3_ENDPOINT_URL``, ``NIGHTREC_BUCKET`` and the AWS chain (objects.py).

It serves the table the latest pointer names (or, with ``--ds``, that day's), and checks every
``serve.poll_interval_s`` whether that pointer (or manifest) changed, with one HEAD request; when
it has, it loads the new manifest and swaps it in whole, so a response always comes from one
committed table. A lookup reads one Parquet row group by range request (reader.py); part footers
are cached. A user with no rows gets 404, or with ``serve.unknown_user: popular`` the
manifest's most popular items (``"source": "popular"``).

The user id is the path segment after ``/recommendations/``, percent-encoded (UTF-8), decoded
exactly once. It is accepted exactly when clean accepts it: it matches ``clean.id_pattern`` and
has at most ``clean.max_id_length`` characters, checked by the same function clean uses
(``contract.ids_ok``: ``pyarrow.compute.match_substring_regex``, RE2), so every published user
can be served.

Inputs are bounded: the request target apart from the user id to ``serve.max_url_length``
(414; the id is bounded by its own rule, at most 12 encoded characters per character), an id
clean would refuse, ``k`` outside ``1..serve.max_k``, any query parameter but ``k`` (400). Every
error is a JSON body ``{"error": ...}``, never a traceback; a client idle for
``serve.request_timeout_s`` is disconnected. The server is the standard library's
(``http.server.ThreadingHTTPServer``, a thread per connection): put it behind a reverse proxy
for TLS and connection limits.

``/metrics`` (one registry per server, :class:`ServeMetrics`): ``nightrec_serve_requests_total``
by route and status, counted before the response is written so a client holding its answer
sees it counted; ``nightrec_serve_request_duration_seconds`` (a histogram by route, from the
parsed request to the response ready, the socket write not included; 405s and http.server's
own errors record 0),
``nightrec_serve_table_age_seconds`` (now minus the served manifest's ``created_at``),
``nightrec_serve_table_ds_timestamp_seconds`` (the ds, midnight UTC), ``nightrec_serve_table_rows``,
``nightrec_serve_table_info`` (ds, publish_id and model_version as labels, value 1) and
``nightrec_serve_table_reloads_total`` / ``nightrec_serve_table_reload_errors_total``. The
table figures are read when scraped; before anything is published they are absent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote_to_bytes, urlsplit

import pyarrow.compute  # noqa: F401 - imported at start, not by the first lookup
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as prometheus_text
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nightrec.table import contract
from nightrec.table.reader import PublishedTable, RecommendationReader, TableChanged, TableNotFound

DEFAULT_PORT = 8090
ENV_PREFIX = "NIGHTREC_SERVE_"  # NIGHTREC_SERVE_PORT, NIGHTREC_SERVE_POLL_INTERVAL_S, ...
ROUTE_RE = re.compile(r"/recommendations/([^/]+)")
# request latency buckets (seconds): a lookup is one cached footer and one range read
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A character is at most 4 UTF-8 bytes, each "%XX" when percent-encoded: the longest encoding of
# an id of n characters is 12 n.
ENCODED_CHAR_MAX = 12
UNKNOWN_USER_MODES = ("404", "popular")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """What the endpoint needs to know. Defaults are params.yaml's; ``nightrec serve`` passes
    params.yaml's values (:meth:`from_params`), ``python -m nightrec.table.serve`` takes flags
    and ``NIGHTREC_SERVE_<FIELD>`` variables (:func:`main`). This module reads no file."""

    # clean.id_pattern (RE2) and clean.max_id_length (characters): the ids clean accepts, hence
    # the ids published; checked by contract.ids_ok, as clean does
    id_pattern: str = contract.DEFAULT_ID_PATTERN
    max_id_length: int = contract.DEFAULT_MAX_ID_LENGTH
    poll_interval_s: float = 5.0
    default_k: int = 10
    max_k: int = 1000
    unknown_user: str = "404"
    max_url_length: int = 2048
    footer_cache_parts: int = 512
    request_timeout_s: float = 10.0

    @classmethod
    def from_params(cls, params: dict) -> ServeConfig:
        """From params.yaml as a dict (loaded by the caller): its ``serve`` group, and clean's
        id rule (``clean.id_pattern``, ``clean.max_id_length``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in params["serve"].items() if k in names}
        cfg = cls(**{**given, "unknown_user": str(given.get("unknown_user", "404")),
                     "id_pattern": params["clean"]["id_pattern"],
                     "max_id_length": int(params["clean"]["max_id_length"])})
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.unknown_user not in UNKNOWN_USER_MODES:
            raise ValueError(f"serve.unknown_user must be one of {UNKNOWN_USER_MODES}, "
                             f"got {self.unknown_user!r}")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(f"serve.default_k must be in 1..max_k ({self.max_k})")
        if self.poll_interval_s <= 0 or self.max_id_length < 1 or self.max_url_length < 32:
            raise ValueError("serve.poll_interval_s, clean.max_id_length or serve.max_url_length "
                             "too small")
        id_ok("x", self)  # a pattern RE2 cannot compile fails at start, not on the first lookup


class TableWatcher:
    """Holds the table being served; a background thread swaps in a new one when the latest
    pointer (or ``ds``'s manifest) changes. ``current()`` never returns a half-loaded table."""

    def __init__(self, reader: RecommendationReader, *, ds: str | None, poll_interval_s: float):
        self.reader, self.ds, self.poll_interval_s = reader, ds, poll_interval_s
        self._table: PublishedTable | None = None
        self._version: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0  # tables swapped in (the first load included)
        self.reload_errors = 0  # checks for a new table that failed (the old one kept serving)

    def current(self) -> PublishedTable | None:
        return self._table

    def refresh(self) -> bool:
        """Load the table again if its pointer changed; True when a new table was swapped in."""
        with self._lock:
            version = self.reader.version(self.ds)
            if version == self._version:
                return False
            try:
                table = self.reader.open(self.ds) if version else None
                if table is not None:
                    table.warm()  # footers fetched before the swap: no lookup waits for one
            except (TableNotFound, TableChanged):
                table = None  # gone again meanwhile: the next poll finds the newer one
            self._table, self._version = table, version
            self.reloads += table is not None
        if table is None:
            log.warning("nothing to serve yet for %s", self.ds or "latest")
        else:
            log.info("serving ds=%s publish_id=%s (%d rows)", table.ds, table.publish_id,
                     table.manifest["rows"])
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
            except Exception:  # keep serving the table we have; try again next interval
                self.reload_errors += 1
                log.exception("could not check for a new table; still serving the previous one")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="nightrec-serve-watch",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_interval_s + 5)


class ServeMetrics(Collector):
    """The endpoint's Prometheus metrics, in a registry of its own (two servers in one process
    do not share counters). Request figures are counted as requests are answered; the table's
    are read from the watcher when scraped."""

    def __init__(self, watcher: TableWatcher, *, clock=time.time):
        self.watcher, self.clock = watcher, clock
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("nightrec_serve_requests", "HTTP requests, by route and "
                                "status, counted when the response is ready (before its write)",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("nightrec_serve_request_duration_seconds", "Time from the "
                                 "parsed request to the response ready (socket write excluded; "
                                 "405s and http.server's own errors record 0), by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(self)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(int(status))).inc()
        self.latency.labels(route=route).observe(seconds)

    def describe(self):
        return []  # the table's metrics come and go with the table: collected, not described

    def collect(self):
        w = self.watcher
        reloads = CounterMetricFamily("nightrec_serve_table_reloads", "Tables loaded or swapped "
                                      "in", value=w.reloads)
        errors = CounterMetricFamily("nightrec_serve_table_reload_errors", "Checks for a new "
                                     "table that failed (the previous table kept serving)",
                                     value=w.reload_errors)
        yield reloads
        yield errors
        table = w.current()
        if table is None:
            return
        m = table.manifest
        info = GaugeMetricFamily("nightrec_serve_table_info", "The served table (value 1)",
                                 labels=["ds", "publish_id", "model_version"])
        info.add_metric([table.ds, table.publish_id or "", table.model_version], 1)
        yield info
        yield GaugeMetricFamily("nightrec_serve_table_rows", "Rows of the served table",
                                value=m["rows"])
        ds_ts = datetime.fromisoformat(table.ds).replace(tzinfo=UTC).timestamp()
        yield GaugeMetricFamily("nightrec_serve_table_ds_timestamp_seconds", "The served "
                                "table's ds, midnight UTC, as Unix time", value=ds_ts)
        created = m.get("created_at")
        if created:
            t = datetime.fromisoformat(created)
            t = t if t.tzinfo else t.replace(tzinfo=UTC)
            yield GaugeMetricFamily("nightrec_serve_table_age_seconds", "Seconds since the "
                                    "served table was published (its manifest's created_at)",
                                    value=self.clock() - t.timestamp())


def route_of(target: str) -> str:
    """The route label of a request target: a bounded set, never the user id."""
    path = urlsplit(target).path
    if path in ("/healthz", "/metrics"):
        return path[1:]
    return "recommendations" if path.startswith("/recommendations/") else "other"


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str, **extra):
        super().__init__(message)
        self.status, self.body = status, {"error": message, **extra}


def id_ok(user_id: str, cfg: ServeConfig) -> bool:
    """Whether clean accepts ``user_id``: ``contract.id_ok``, the function clean's check is
    (``contract.ids_ok``), with the same pattern and length bound, so serve and clean can never
    disagree. Verdicts are cached (``contract.ID_CHECK_CACHE`` ids)."""
    return contract.id_ok(user_id, pattern=cfg.id_pattern, max_length=cfg.max_id_length)


def parse_lookup(target: str, cfg: ServeConfig) -> tuple[str, int] | None:
    """``(user_id, k)`` from a request target, None for ``/healthz``; BadRequest when invalid.

    ``target`` is the request target as http.server gives it (the raw bytes as Latin-1). The user
    id segment is percent-decoded once, as UTF-8; raw UTF-8 bytes in it are taken as they are.
    """
    if len(target) > cfg.max_url_length + ENCODED_CHAR_MAX * cfg.max_id_length:
        raise BadRequest(HTTPStatus.REQUEST_URI_TOO_LONG, "request target too long")
    parts = urlsplit(target)
    match = ROUTE_RE.fullmatch(parts.path)
    if len(target) - (len(match[1]) if match else 0) > cfg.max_url_length:
        raise BadRequest(HTTPStatus.REQUEST_URI_TOO_LONG,
                         f"request target longer than {cfg.max_url_length} characters "
                         "(not counting the user id)")
    if parts.path == "/healthz" and not parts.query:
        return None
    if not match:
        raise BadRequest(HTTPStatus.NOT_FOUND, "no such resource",
                         routes=["/recommendations/<percent-encoded user_id>?k=N", "/healthz",
                                 "/metrics"])
    try:
        raw = match[1].encode("latin-1")  # http.server decoded the request line as Latin-1
        user_id = unquote_to_bytes(raw).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "user_id is not valid UTF-8") from None
    if not id_ok(user_id, cfg):
        raise BadRequest(HTTPStatus.BAD_REQUEST,
                         f"user_id must be 1..{cfg.max_id_length} characters matching "
                         f"clean.id_pattern {cfg.id_pattern}, percent-encoded")
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, max_num_fields=4)
    except ValueError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "too many query parameters") from None
    unknown = sorted({name for name, _ in query} - {"k"})
    if unknown or len(query) > 1:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "the only query parameter is k, given once",
                         unknown=unknown)
    raw_k = query[0][1] if query else str(cfg.default_k)
    if not (raw_k.isascii() and raw_k.isdigit() and len(raw_k) <= 6
            and 1 <= int(raw_k) <= cfg.max_k):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"k must be an integer in 1..{cfg.max_k}")
    return user_id, int(raw_k)


def recommendations_body(table: PublishedTable, user_id: str, k: int, cfg: ServeConfig):
    """``(status, body)`` for one user's lookup on ``table``."""
    rows = table.lookup(user_id).slice(0, k)
    head = {"user_id": user_id, "ds": table.ds, "publish_id": table.publish_id,
            "model_version": table.model_version}
    if rows.num_rows:
        items = [{"rank": r, "item_id": i, "score": s} for r, i, s in zip(
            rows["rank"].to_pylist(), rows["item_id"].to_pylist(), rows["score"].to_pylist(),
            strict=True)]
        return HTTPStatus.OK, {**head, "source": "model", "k": k, "items": items}
    popular = table.popular(k) if cfg.unknown_user == "popular" else []
    if popular:
        items = [{"rank": n, "item_id": p["item_id"], "interactions": p["interactions"]}
                 for n, p in enumerate(popular, 1)]
        return HTTPStatus.OK, {**head, "source": "popular", "k": k, "items": items}
    return HTTPStatus.NOT_FOUND, {"error": "unknown user", **head}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response has a Content-Length
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    server_version = "nightrec-serve"
    sys_version = ""
    server: ServeServer

    def setup(self) -> None:
        self.timeout = self.server.config.request_timeout_s
        super().setup()

    def do_GET(self) -> None:
        self._handle(head=False)

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # every other method, known or not
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED,
                   {"error": f"method {self.command} not allowed", "allowed": ["GET", "HEAD"]},
                   route=route_of(self.path), headers={"Allow": "GET, HEAD"}, close=True)

    def _handle(self, *, head: bool) -> None:
        # A body on a GET is not read; close after answering so it cannot be taken for the next
        # request on this connection.
        close = bool(self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding"))
        started = time.perf_counter()
        if urlsplit(self.path).path == "/metrics" and len(self.path) <= 256:
            data = prometheus_text(self.server.metrics.registry)
            self._send_bytes(HTTPStatus.OK, data, CONTENT_TYPE_LATEST, route="metrics",
                             started=started, head=head, close=close)
            return
        try:
            status, body = self._answer()
        except BadRequest as e:
            status, body = e.status, e.body
        except Exception:  # the client gets a JSON 500; the traceback goes to our log only
            log.exception("lookup failed: %s", self.path[:200])
            status, body = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}
        self._send(status, body, route=route_of(self.path), started=started, head=head,
                   close=close)

    def _answer(self) -> tuple[HTTPStatus, dict]:
        cfg, watcher = self.server.config, self.server.watcher
        lookup = parse_lookup(self.path, cfg)
        table = watcher.current()
        if table is None:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no published table yet"}
        if lookup is None:
            return HTTPStatus.OK, {"ds": table.ds, "publish_id": table.publish_id,
                                   "model_version": table.model_version,
                                   "rows": table.manifest["rows"]}
        user_id, k = lookup
        try:
            return recommendations_body(table, user_id, k, cfg)
        except TableChanged:  # replaced under us: load the new table and answer from it
            watcher.refresh()
            table = watcher.current()
            if table is None:
                return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no published table now"}
            return recommendations_body(table, user_id, k, cfg)

    def _send(self, status: int, body: dict, *, route: str, started: float | None = None,
              head: bool = False, close: bool = False, headers: dict | None = None) -> None:
        self._send_bytes(status, json.dumps(body).encode(), "application/json", route=route,
                         started=started, head=head, close=close, headers=headers)

    def _send_bytes(self, status: int, data: bytes, content_type: str, *, route: str,
                    started: float | None = None, head: bool = False, close: bool = False,
                    headers: dict | None = None) -> None:
        """Answer, counting the request in /metrics *before* the response leaves: a client
        that has its answer (and then scrapes) sees it counted. The latency observed runs
        from the request's parse to the response being ready, not through the socket write."""
        elapsed = 0.0 if started is None else time.perf_counter() - started
        self.server.metrics.observe(route, status, elapsed)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 requests are not served")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """http.server's own errors (malformed request line, headers too long, ...) as JSON,
        always with a status line (http.server answers an unparsable line HTTP/0.9-style)."""
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._send(code, {"error": message or phrase}, route="other",
                   head=self.command == "HEAD", close=True)

    def log_message(self, format: str, *args) -> None:  # http.server's signature
        log.debug("%s %s", self.address_string(), format % args)


class ServeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], *, config: ServeConfig, watcher: TableWatcher):
        self.config, self.watcher = config, watcher
        self.metrics = ServeMetrics(watcher)
        super().__init__(address, _Handler)

    def server_close(self) -> None:
        self.watcher.stop()
        super().server_close()


def make_server(host: str = "127.0.0.1", port: int = 0, *, ds: str | None = None,
                config: ServeConfig | None = None, bucket: str | None = None) -> ServeServer:
    """A started watcher and a bound (not yet serving) server; port 0 picks a free port.

    ``config``: default ``ServeConfig()``; ``bucket``: default ``NIGHTREC_BUCKET``.
    """
    cfg = config or ServeConfig()
    cfg.check()
    reader = RecommendationReader(bucket, footer_cache_parts=cfg.footer_cache_parts)
    watcher = TableWatcher(reader, ds=contract.check_ds(ds) if ds else None,
                           poll_interval_s=cfg.poll_interval_s)
    watcher.refresh()
    watcher.start()
    try:
        return ServeServer((host, port), config=cfg, watcher=watcher)
    except BaseException:
        watcher.stop()
        raise


def config_from_env(base: ServeConfig | None = None) -> ServeConfig:
    """``base`` (default ``ServeConfig()``) with each ``NIGHTREC_SERVE_<FIELD>`` that is set
    (``NIGHTREC_SERVE_MAX_K=500``), converted to the field's type; ValueError when one does not
    convert."""
    base = base or ServeConfig()
    changes = {}
    for f in dataclasses.fields(base):
        raw = os.environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            kind = type(getattr(base, f.name))
            try:
                changes[f.name] = kind(raw)
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a "
                                 f"{kind.__name__}") from None
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None, *, config: ServeConfig | None = None,
         port: int | None = None) -> int:
    """Serve until SIGINT/SIGTERM. The object store comes from the environment (objects.py).

    ``config`` and ``port``: the defaults the flags override (``nightrec serve`` passes
    params.yaml's); without them, ``NIGHTREC_SERVE_<FIELD>`` variables over ServeConfig's own
    defaults, and ``NIGHTREC_SERVE_PORT`` or 8090.
    """
    ap = argparse.ArgumentParser(prog="nightrec serve", description=__doc__.split("\n\n")[0])
    try:
        base = config or config_from_env()
        default_port = port if port is not None else int(
            os.environ.get(ENV_PREFIX + "PORT", DEFAULT_PORT))
    except ValueError as e:
        ap.error(str(e))
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=default_port,
                    help=f"port (default {default_port}; 0 picks a free one)")
    ap.add_argument("--ds", help="serve this day's table (YYYY-MM-DD) instead of the latest")
    ap.add_argument("--bucket", help="bucket (default NIGHTREC_BUCKET, else nightrec)")
    for f in dataclasses.fields(base):
        value = getattr(base, f.name)
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(value), default=value,
                        help=f"default {value!r}".replace("%", "%%"))  # argparse %-formats
    args = ap.parse_args(argv)
    try:
        if args.ds:
            contract.check_ds(args.ds)
        cfg = dataclasses.replace(base, **{f.name: getattr(args, f.name)
                                           for f in dataclasses.fields(base)})
        cfg.check()
    except ValueError as e:
        ap.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = make_server(args.host, args.port, ds=args.ds, config=cfg, bucket=args.bucket)
    host, bound = server.server_address[:2]

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"nightrec serve: {args.ds or 'latest'} table on "
          f"http://{host}:{bound}/recommendations/<user_id>?k=N", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
