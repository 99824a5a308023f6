"""``nightrec serve`` (nightrec/table/serve.py): a real server on a free port over the real SeaweedFS.

Lookups, HEAD, every user id clean accepts (percent-encoded) and none it refuses, unknown users
(404 or popular items), bounded inputs and malformed requests
(JSON 4xx, never a traceback), methods other than GET/HEAD (405), and the reload when the latest
pointer moves.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import socket
import threading
import time
from urllib.parse import quote

import pyarrow as pa
import pytest

from nightrec.core import settings
from nightrec.store import storage
from nightrec.table import contract, serve
from nightrec.tasks import clean, publish
from tests.test_publish import stage

DS1, DS2 = "2026-04-01", "2026-04-02"


def publish_table(ds: str, version: str = "mf-20260401-aaaaaaaa", n_users: int = 30) -> None:
    publish.run(stage(ds, run_key=f"r-{version}", model_version=version, n_users=n_users,
                          k=5), params=settings.load_params())


@contextlib.contextmanager
def running(**serve_keys):
    base = settings.load_params()
    params = {**base, "serve": {**base["serve"], "poll_interval_s": 0.2, **serve_keys}}
    server = serve.make_server("127.0.0.1", 0, config=serve.ServeConfig.from_params(params))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def request(port: int, target: str, method: str = "GET") -> tuple[int, dict, dict | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, target)
        resp = conn.getresponse()
        raw = resp.read()
        body = json.loads(raw) if raw else None
        return resp.status, dict(resp.getheaders()), body
    finally:
        conn.close()


def raw_request(port: int, data: bytes) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_lookup_head_and_health(bucket):
    publish_table(DS1)
    with running() as port:
        status, headers, body = request(port, "/recommendations/u00003?k=3")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert (body["user_id"], body["ds"], body["source"], body["k"]) == ("u00003", DS1,
                                                                           "model", 3)
        assert [i["rank"] for i in body["items"]] == [1, 2, 3]
        scores = [i["score"] for i in body["items"]]
        assert scores == sorted(scores, reverse=True)
        status, _, body = request(port, "/recommendations/u00003")  # default k
        assert status == 200 and len(body["items"]) == 5  # the table holds 5 per user
        status, headers, body = request(port, "/recommendations/u00003", method="HEAD")
        assert status == 200 and body is None and int(headers["Content-Length"]) > 0
        status, _, body = request(port, "/healthz")
        assert status == 200 and body["ds"] == DS1 and body["rows"] == 150


def test_unknown_user_gets_404_or_popular_items_when_configured(bucket):
    publish_table(DS1)
    with running() as port:
        status, _, body = request(port, "/recommendations/nobody")
        assert status == 404 and body["error"] == "unknown user" and body["ds"] == DS1
    with running(unknown_user="popular") as port:
        status, _, body = request(port, "/recommendations/nobody?k=2")
        assert status == 200 and body["source"] == "popular" and len(body["items"]) == 2
        popular = storage.read_json(storage.s3_uri(f"recommendations/ds={DS1}/_manifest.json"))
        assert [i["item_id"] for i in body["items"]] == [
            p["item_id"] for p in popular["popular"][:2]]


# Ids clean accepts (clean.id_pattern: letters and digits of any script, _ . : @ / = -), up to
# clean.max_id_length (256) characters; and ids it refuses.
ODD_IDS = ["josé/ü=1", "名前:7", "x=y/z@host", "Ωmega.9-_", "١٢٣", "a" * 256, "é" * 256]
REFUSED_IDS = ["a" * 257, ".hidden", "-x", "/root", "has space", "semi;colon", "a+b", "%41",
               "tab\tid", "emoji🙂"]


def test_serves_every_id_clean_accepts_percent_encoded_and_refuses_the_rest(bucket):
    pattern, max_len = (settings.load_params()["clean"][k] for k in ("id_pattern", "max_id_length"))
    assert clean._id_ok(pa.array(ODD_IDS), pattern, max_len).all()  # the same check as clean's
    assert not clean._id_ok(pa.array(REFUSED_IDS), pattern, max_len).any()
    assert contract.ids_ok(pa.array(ODD_IDS + REFUSED_IDS), pattern, max_len).to_pylist() == [
        True] * len(ODD_IDS) + [False] * len(REFUSED_IDS)  # clean's check is the contract's
    publish.run(stage(DS1, run_key="r-ids", model_version="mf-20260401-aaaaaaaa",
                           user_ids=[*ODD_IDS, "u00001"], shards=2, k=5),
                params=settings.load_params())
    with running() as port:
        for uid in ODD_IDS:
            status, _, body = request(port, "/recommendations/" + quote(uid, safe="") + "?k=2")
            assert (status, body.get("user_id")) == (200, uid), (uid, status, body)
            assert [i["rank"] for i in body["items"]] == [1, 2]
        # '=', ':' and '@' may stay as they are in a path; '/' is %2F; raw UTF-8 is taken as is
        assert request(port, "/recommendations/x=y%2Fz@host")[2]["user_id"] == "x=y/z@host"
        status, body = raw_request(port, "GET /recommendations/名前:7 HTTP/1.1\r\n"
                                   "Connection: close\r\n\r\n".encode())
        assert (status, body["user_id"]) == (200, "名前:7")
        # decoded once: %252F is the text "%2F", which clean refuses, not a '/'
        assert request(port, "/recommendations/jos%C3%A9%252F%C3%BC=1")[0] == 400
        # ids clean accepts but nobody has: valid, so 404, even a 256-char CJK id (2,304
        # characters percent-encoded: the URL bound does not count the id)
        for uid in ("b" * 256, "中" * 256):
            status, _, body = request(port, "/recommendations/" + quote(uid, safe=""))
            assert (status, body["error"]) == (404, "unknown user"), uid
        for uid in REFUSED_IDS:
            status, _, body = request(port, "/recommendations/" + quote(uid, safe=""))
            assert status == 400 and "clean.id_pattern" in body["error"], (uid, status, body)


BAD_TARGETS = [
    ("/recommendations/" + "a" * 257, 400),  # clean.max_id_length is 256
    ("/recommendations/has%20space", 400),
    ("/recommendations/%ff%fe", 400),
    ("/recommendations/..%2F..%2Fetc%2Fpasswd", 400),
    ("/recommendations/u00001?k=0", 400),
    ("/recommendations/u00001?k=1001", 400),
    ("/recommendations/u00001?k=-1", 400),
    ("/recommendations/u00001?k=abc", 400),
    ("/recommendations/u00001?k=%EF%BC%91", 400),  # a full-width digit one
    ("/recommendations/u00001?k=1&k=2", 400),
    ("/recommendations/u00001?user=1", 400),
    ("/recommendations/u00001?" + "&".join(["k=1"] * 10), 400),
    ("/recommendations/u00001?k=" + "1" * 2100, 414),
    ("/recommendations/a/b", 404),
    ("/recommendations/", 404),
    ("/", 404),
]


def test_bounded_inputs_and_bad_methods_get_json_errors(bucket):
    publish_table(DS1)
    with running() as port:
        for target, expected in BAD_TARGETS:
            status, headers, body = request(port, target)
            assert status == expected, (target, status, body)
            assert headers["Content-Type"] == "application/json" and body["error"], target
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FROB"):
            status, headers, body = request(port, "/recommendations/u00001", method=method)
            assert status == 405 and headers["Allow"] == "GET, HEAD", method
            assert body["allowed"] == ["GET", "HEAD"]
        status, body = raw_request(port, b"GARBAGE\r\n\r\n")
        assert status == 400 and body["error"].startswith("Bad request syntax")
        status, body = raw_request(port, b"GET /recommendations/u00001\r\n\r\n")
        assert status == 400 and "HTTP/0.9" in body["error"]
        status, body = raw_request(port, b"GET /x HTTP/1.1\r\nX: " + b"y" * 70000 + b"\r\n\r\n")
        assert status == 431 and body["error"] == "Line too long"
        status, body = raw_request(port, b"GET /recommendations/u00001 HTTP/9.9\r\n\r\n")
        assert status == 505 and "error" in body
        status, body = raw_request(port, b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n")
        assert status == 414 and "Traceback" not in json.dumps(body)
        # still serving after all that
        assert request(port, "/recommendations/u00001?k=1")[0] == 200


def test_reloads_when_the_latest_pointer_moves_and_503_before_anything(bucket):
    with running() as port:
        status, _, body = request(port, "/recommendations/u00001")
        assert status == 503 and body == {"error": "no published table yet"}
        publish_table(DS1)
        first = _wait_for(port, lambda b: b.get("ds") == DS1)
        publish_table(DS2, version="mf-20260402-bbbbbbbb", n_users=40)
        second = _wait_for(port, lambda b: b.get("ds") == DS2)
        assert first["model_version"] != second["model_version"] == "mf-20260402-bbbbbbbb"
        publish_table(DS2, version="mf-20260402-cccccccc", n_users=40)  # republish of the same ds
        third = _wait_for(port, lambda b: b.get("model_version") == "mf-20260402-cccccccc")
        assert third["publish_id"] != second["publish_id"]


def _wait_for(port: int, ok, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, _, body = request(port, "/recommendations/u00001?k=2")
        if status == 200 and ok(body):
            return body
        assert time.monotonic() < deadline, (status, body)
        time.sleep(0.05)


def test_main_refuses_a_bad_ds_and_a_bad_setting(s3, monkeypatch):
    with pytest.raises(SystemExit):
        serve.main(["--ds", "2026-02-30"])
    with pytest.raises(SystemExit):
        serve.main(["--unknown-user", "x"])
    base = settings.load_params()
    with pytest.raises(ValueError, match="unknown_user"):
        serve.ServeConfig.from_params({**base, "serve": {**base["serve"], "unknown_user": "x"}})
    # params.yaml's values are ServeConfig's own defaults, so the standalone endpoint (no
    # params.yaml) behaves as `nightrec serve` does
    assert serve.ServeConfig.from_params(base) == serve.ServeConfig()
    monkeypatch.setenv("NIGHTREC_SERVE_MAX_K", "50")
    monkeypatch.setenv("NIGHTREC_SERVE_UNKNOWN_USER", "popular")
    assert serve.config_from_env() == serve.ServeConfig(max_k=50, unknown_user="popular")
    monkeypatch.setenv("NIGHTREC_SERVE_MAX_K", "many")
    with pytest.raises(SystemExit):
        serve.main([])


def test_nightrec_serve_cli_answers_and_stops_on_sigterm(bucket):
    import os
    import re
    import signal
    import subprocess
    import sys
    from pathlib import Path

    publish_table(DS1)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "nightrec"), "serve", "--port", "0"],
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
        status, _, body = request(port, "/recommendations/u00003?k=2")
        assert status == 200 and [i["rank"] for i in body["items"]] == [1, 2]
        assert request(port, "/recommendations/../../etc/passwd")[0] in (400, 404)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def scrape(port: int) -> dict[str, list]:
    """``/metrics`` parsed by prometheus-client's own parser: {sample name: [samples]}."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
        text = resp.read().decode()
    finally:
        conn.close()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _value(samples: dict, name: str, **labels) -> float:
    found = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v
                                                           for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def test_metrics_count_requests_by_route_and_status_and_describe_the_served_table(bucket):
    with running() as port:
        before = scrape(port)
        assert "nightrec_serve_table_info" not in before  # nothing published: no table figures
        assert _value(before, "nightrec_serve_table_reloads_total") == 0
        assert request(port, "/recommendations/u00001")[0] == 503
        publish_table(DS1)
        _wait_for(port, lambda b: b.get("ds") == DS1)  # 503s until the reload, then one 200
        for target in ("/recommendations/u00002?k=2", "/recommendations/nobody",
                       "/recommendations/u00002?k=0", "/healthz", "/nowhere"):
            request(port, target)
        request(port, "/healthz", method="DELETE")
        m = scrape(port)
        count = {(s.labels["route"], s.labels["status"]): s.value
                 for s in m["nightrec_serve_requests_total"]}
        assert count[("recommendations", "404")] == 1 and count[("recommendations", "400")] == 1
        assert count[("recommendations", "200")] == 2  # _wait_for's hit and the k=2 lookup
        assert count[("recommendations", "503")] >= 1
        assert count[("healthz", "200")] == 1 and count[("healthz", "405")] == 1
        assert count[("other", "404")] == 1
        assert count[("metrics", "200")] == 1  # the first scrape (this one is counted after)
        lookups = sum(v for (route, _), v in count.items() if route == "recommendations")
        assert _value(m, "nightrec_serve_request_duration_seconds_count",
                      route="recommendations") == lookups
        inf = _value(m, "nightrec_serve_request_duration_seconds_bucket",
                     route="recommendations", le="+Inf")
        assert inf == lookups
        manifest = storage.read_json(storage.s3_uri(f"recommendations/ds={DS1}/_manifest.json"))
        assert _value(m, "nightrec_serve_table_info", ds=DS1,
                      model_version="mf-20260401-aaaaaaaa") == 1
        assert _value(m, "nightrec_serve_table_rows") == manifest["rows"] == 150
        assert _value(m, "nightrec_serve_table_ds_timestamp_seconds") == 1775001600  # 2026-04-01
        created = dt.datetime.fromisoformat(manifest["created_at"]).timestamp()
        age = _value(m, "nightrec_serve_table_age_seconds")
        assert 0 <= age <= time.time() - created + 1
        assert _value(m, "nightrec_serve_table_reloads_total") == 1
        publish_table(DS2, version="mf-20260402-bbbbbbbb", n_users=40)
        _wait_for(port, lambda b: b.get("ds") == DS2)
        m = scrape(port)
        assert _value(m, "nightrec_serve_table_reloads_total") == 2
        assert _value(m, "nightrec_serve_table_info", ds=DS2) == 1
        assert len(m["nightrec_serve_table_info"]) == 1  # the old table's series is gone
        assert _value(m, "nightrec_serve_table_rows") == 200


def test_a_request_is_counted_before_its_response_leaves(s3, monkeypatch):
    """A client that holds its answer and then scrapes sees the request counted, however slow
    the recording: the handler thread's count used to follow the write (one CI run scraped
    before a 405 was counted)."""
    observe = serve.ServeMetrics.observe

    def slow_observe(self, route, status, seconds):
        if route != "metrics":
            time.sleep(0.3)  # a handler thread descheduled between answer and count
        observe(self, route, status, seconds)

    monkeypatch.setattr(serve.ServeMetrics, "observe", slow_observe)
    with running() as port:
        for method in ("GET", "DELETE", "HEAD"):
            request(port, "/healthz", method=method)
            count = {(s.labels["route"], s.labels["status"]): s.value
                     for s in scrape(port)["nightrec_serve_requests_total"]}
            status = {"GET": "503", "DELETE": "405", "HEAD": "503"}[method]
            assert count.get(("healthz", status)) == (2 if method == "HEAD" else 1), method
