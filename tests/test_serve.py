"""The online predictor's HTTP service (deepfm.serve, issue 14 item 4).

Fast tests drive :func:`deepfm.serve.make_app` in-process with Starlette's TestClient around a stand-in
predictor (the request shapes, the limits, the headers). The slow ones start the real service,
``python -m deepfm.serve --model model.pt2 --port 0``, as a subprocess on 127.0.0.1 with the shared
exported model (tests/conftest.py ``exported``) and talk to it with http.client from threads: the
probabilities equal ``Predictor.predict``'s, a rejected value names its field, /health names the model,
a bounded load test, and a model that fails its golden check never serves (exit 2).
"""
from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest

from tests.conftest import ROOT, SMALL

FP_HEADER = "X-Model-Fingerprint"


# --- fast: the app in-process, with a stand-in predictor -------------------------------------------------

class FakePredictor:
    """What make_app uses of a Predictor: fingerprint, card, path, predict (I1 must be a number)."""

    fingerprint = "fp-test-0001"
    path = Path("fake.pt2")

    def __init__(self):
        from pipeline.contract import load_contract
        manifest = SimpleNamespace(contract=load_contract(SMALL), feature_fingerprint="feat-0001")
        self.card = SimpleNamespace(model_fingerprint=self.fingerprint, model="deepfm", manifest=manifest,
                                    feature_fingerprint="feat-0001", created="2026-01-01T00:00:00Z",
                                    field_names=("I1", "C1"), checkpoint="step_10", global_step=10,
                                    neg_sample_rate=0.25, torch_version="2.13.0", golden=(),
                                    metrics={"test": {"auc": 0.7}})
        self.calls = 0

    def predict(self, rows):
        self.calls += 1
        out = []
        for i, r in enumerate(rows):
            v = r.get("I1")
            if isinstance(v, str) and v and not v.lstrip("-").isdigit():
                raise ValueError(f"row {i}: I1: {v!r} is not a number")
            out.append(0.125 + i / 1024)
        return np.array(out, dtype=np.float64)


@pytest.fixture
def client():
    from starlette.testclient import TestClient

    from deepfm.serve import make_app
    fake = FakePredictor()
    with TestClient(make_app(fake, max_rows=5, threads=2)) as c:     # type: ignore[arg-type]
        c.fake = fake
        yield c


def test_predict_answers_probabilities_with_the_fingerprint(client):
    r = client.post("/predict", json={"rows": [{"I1": "5"}, {"I1": 3, "C1": "ab"}, {}]})
    assert r.status_code == 200, r.text
    assert r.headers[FP_HEADER] == "fp-test-0001"
    assert r.json() == {"model": "fp-test-0001", "probabilities": [0.125, 0.125 + 1 / 1024, 0.125 + 2 / 1024]}
    assert client.post("/predict", json={"rows": []}).json()["probabilities"] == []


def test_a_rejected_value_is_400_naming_the_row_and_field(client):
    r = client.post("/predict", json={"rows": [{"I1": "1"}, {"I1": "five"}]})
    assert r.status_code == 400
    assert r.json()["error"].startswith("row 1: I1: 'five'")
    assert r.headers[FP_HEADER] == "fp-test-0001" and r.json()["model"] == "fp-test-0001"


@pytest.mark.parametrize("body, says", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "got an array"),
    (b'{"row": []}', "without rows"),
    (b'{"rows": {"I1": 1}}', "got rows as an object"),
    (b'{"rows": [{"I1": 1}, 7]}', "row 1: expected an object"),
    (b'{"rows": [null]}', "row 0: expected an object of field -> value, got null"),
    (b'{"rows": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests too deep"),
])
def test_a_body_that_is_not_rows_is_400(client, body, says):
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert says in r.json()["error"], r.json()
    assert r.headers[FP_HEADER] == "fp-test-0001"


def test_too_many_rows_is_413_and_not_scored(client):
    r = client.post("/predict", json={"rows": [{}] * 6})
    assert r.status_code == 413
    assert "6 rows; at most 5" in r.json()["error"]
    assert client.fake.calls == 0
    assert client.post("/predict", json={"rows": [{}] * 5}).status_code == 200


def test_too_large_a_body_is_413(client):
    from deepfm.serve import BYTES_PER_ROW
    big = b'{"rows": [{"C1": "' + b"x" * ((1 << 20) + BYTES_PER_ROW * 5) + b'"}]}'
    r = client.post("/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "at most" in r.json()["error"]


def test_health_names_the_model(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.headers[FP_HEADER] == "fp-test-0001"
    h = r.json()
    assert h["status"] == "ok" and h["model"] == "fp-test-0001" and h["model_name"] == "deepfm"
    assert h["feature_fingerprint"] == "feat-0001" and h["created"] == "2026-01-01T00:00:00Z"
    assert h["contract"] == "criteo_small" and h["fields"] == ["I1", "C1"]


def test_other_paths_and_methods_are_json_errors_with_the_fingerprint(client):
    r = client.get("/predict")
    assert r.status_code == 405 and r.headers[FP_HEADER] == "fp-test-0001" and "GET /predict" in r.json()["error"]
    r = client.post("/nope", json={})
    assert r.status_code == 404 and r.headers[FP_HEADER] == "fp-test-0001"


def test_a_failure_of_the_model_is_500_naming_it(client):
    def boom(rows):
        raise RuntimeError("the graph broke")
    client.fake.predict = boom
    r = client.post("/predict", json={"rows": [{}]})
    assert r.status_code == 500 and "RuntimeError: the graph broke" in r.json()["error"]
    assert r.headers[FP_HEADER] == "fp-test-0001"


def test_the_listening_socket_is_tcp_so_asyncio_sets_nodelay():
    """asyncio turns Nagle off only on sockets whose proto is TCP; with proto 0 each answer waited 40 ms."""
    from deepfm.serve import listen
    s = listen("127.0.0.1", 0)
    try:
        assert s.proto == socket.IPPROTO_TCP and s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        with socket.create_connection(s.getsockname()[:2], timeout=5):
            accepted, _ = s.accept()
            with accepted:
                assert accepted.proto == socket.IPPROTO_TCP
    finally:
        s.close()


# --- slow: the real service in a subprocess ------------------------------------------------------------

class Service:
    """A running ``python -m deepfm.serve``; :meth:`request` is one HTTP call on a new connection."""

    def __init__(self, proc: subprocess.Popen, port: int, start_line: str):
        self.proc, self.port, self.start_line = proc, port, start_line

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def request(self, method: str, path: str, body: Any = None,
                conn: http.client.HTTPConnection | None = None) -> tuple[int, Message, Any]:
        c = conn or self.connect()
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        c.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        payload = r.read()
        if conn is None:
            c.close()
        return r.status, r.headers, json.loads(payload)          # headers: case-insensitive


def start_service(model: Path, *extra: str, timeout: float = 60) -> Service:
    """Starts the service on a free port (``--port 0``; the start line names it) and waits for /health."""
    proc = subprocess.Popen([sys.executable, "-m", "deepfm.serve", "--model", str(model), "--port", "0", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    port = None
    deadline = time.monotonic() + timeout
    while port is None:
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            raise AssertionError(f"the service exited ({proc.returncode}) before serving:\n{''.join(lines)}")
        lines.append(line)
        m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
        assert time.monotonic() < deadline, "".join(lines)
    # the rest of its output is drained so that it never blocks on a full pipe
    threading.Thread(target=lines.extend, args=(proc.stdout,), daemon=True).start()
    s = Service(proc, port, lines[-1])
    while True:
        try:
            if s.request("GET", "/health")[0] == 200:
                return s
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.1)


@pytest.fixture(scope="module")
def service(exported) -> Iterator[Service]:
    s = start_service(exported, "--threads", "2", "--max-rows", "1000")
    yield s
    s.proc.terminate()
    try:      # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught (the usual exit status)
        assert s.proc.wait(20) in (0, -signal.SIGTERM)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


@pytest.fixture(scope="module")
def predictor(exported):
    from deepfm.serving import Predictor
    return Predictor.load(exported)


@pytest.fixture(scope="module")
def raw_rows(predictor, raw_logs) -> list[dict[str, Any]]:
    """500 lines of the shared test day as rows of text, some values made numbers, null or absent, plus the
    card's golden rows (edge values)."""
    from pipeline.rows import split_line
    contract = predictor.card.manifest.contract
    day = sorted(p for p in raw_logs.iterdir() if p.name.startswith("day_"))[-1]
    rows: list[dict[str, Any]] = []
    with open(day) as f:
        for i, line in zip(range(500), f):
            row: dict[str, Any] = dict(split_line(line.rstrip("\n"), contract))
            row.pop("label", None)
            if i % 7 == 1 and row.get("I1"):
                row["I1"] = float(row["I1"])           # a number, as a JSON client may send it
            if i % 11 == 2:
                row["C3"] = None
            if i % 13 == 3:
                row.pop("C5", None)
            rows.append(row)
    rows += [dict(g.row) for g in predictor.card.golden]
    return rows


@pytest.mark.slow
def test_start_line_and_health_name_the_model(service, predictor):
    assert predictor.fingerprint in service.start_line and "127.0.0.1" in service.start_line
    status, headers, h = service.request("GET", "/health")
    assert status == 200 and headers[FP_HEADER] == predictor.fingerprint
    c = predictor.card
    assert h["status"] == "ok" and h["model"] == c.model_fingerprint and h["model_name"] == c.model
    assert h["feature_fingerprint"] == c.feature_fingerprint and h["created"] == c.created
    assert h["fields"] == list(c.field_names)


@pytest.mark.slow
def test_http_probabilities_equal_the_predictors(service, predictor, raw_rows):
    want = predictor.predict(raw_rows)
    status, headers, out = service.request("POST", "/predict", {"rows": raw_rows})
    assert status == 200, out
    assert headers[FP_HEADER] == predictor.fingerprint and out["model"] == predictor.fingerprint
    got = np.array(out["probabilities"], dtype=np.float64)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)             # float64 through JSON's shortest repr: exact
    # one row at a time: what the predictor gives that one row (the graph is float32, so the batch's
    # size moves a score by float32 rounding: ~1e-8 here, checked against the batch's within 1e-6)
    for i in (0, 1, 2, 3, len(raw_rows) - 1):
        _, _, one = service.request("POST", "/predict", {"rows": [raw_rows[i]]})
        assert abs(one["probabilities"][0] - predictor.predict([raw_rows[i]])[0]) <= 1e-9
        assert abs(one["probabilities"][0] - want[i]) <= 1e-6


@pytest.mark.slow
def test_http_rejections(service, predictor, raw_rows):
    row = dict(raw_rows[0], I1="five")
    status, headers, out = service.request("POST", "/predict", {"rows": [raw_rows[1], row]})
    assert status == 400 and headers[FP_HEADER] == predictor.fingerprint
    assert out["error"].startswith("row 1: I1: 'five' is not a number"), out
    status, _, out = service.request("POST", "/predict", {"rows": [dict(raw_rows[0], I3=float("inf"))]})
    assert status == 400 and out["error"].startswith("row 0: I3:"), out
    status, _, out = service.request("POST", "/predict", b'{"rows": [')
    assert status == 400 and "not JSON" in out["error"]
    status, _, out = service.request("POST", "/predict", {"rows": [{}] * 1001})
    assert status == 413 and "at most 1000" in out["error"]


@pytest.mark.slow
def test_one_client_is_not_held_by_nagle(service, raw_rows):
    """One keep-alive client, requests one after another: a round trip of about a millisecond, not the
    40 ms of Nagle's algorithm meeting the client's delayed ACK (uvicorn writes an answer's head and body
    apart)."""
    conn, seconds = service.connect(), []
    try:
        for i in range(40):
            t = time.perf_counter()
            assert service.request("POST", "/predict", {"rows": [raw_rows[i]]}, conn)[0] == 200
            seconds.append(time.perf_counter() - t)
    finally:
        conn.close()
    assert sorted(seconds)[len(seconds) // 2] < 0.025, seconds


@pytest.mark.slow
def test_bounded_load(service, predictor, raw_rows, capsys):
    """8 clients x 50 requests (keep-alive), of 1 row and of 32 rows: every answer 200 and right."""
    clients, per_client = 8, 50
    for size in (1, 32):
        batches = [raw_rows[(k * size) % 480:(k * size) % 480 + size] for k in range(clients * per_client)]
        want = [predictor.predict(b) for b in batches]

        def client(c: int) -> list[float]:
            conn, seconds = service.connect(), []
            try:
                for k in range(c, len(batches), clients):
                    t = time.perf_counter()
                    status, headers, out = service.request("POST", "/predict", {"rows": batches[k]}, conn)
                    seconds.append(time.perf_counter() - t)
                    assert status == 200, out
                    assert headers[FP_HEADER] == predictor.fingerprint
                    np.testing.assert_allclose(out["probabilities"], want[k], rtol=0, atol=1e-9)
            finally:
                conn.close()
            return seconds

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(client, c) for c in range(clients)]
            latencies = sorted(s for f in futures for s in f.result(timeout=60))
        wall = time.perf_counter() - t0
        assert len(latencies) == clients * per_client
        with capsys.disabled():
            print(f"\n[serve load] {clients} clients x {per_client} requests of {size} row(s): "
                  f"{len(latencies) / wall:,.0f} requests/s, {len(latencies) * size / wall:,.0f} rows/s, "
                  f"p50 {1e3 * latencies[len(latencies) // 2]:.1f} ms, "
                  f"p99 {1e3 * latencies[int(len(latencies) * 0.99)]:.1f} ms")


@pytest.mark.slow
def test_a_model_failing_its_golden_check_does_not_serve(exported, tmp_path):
    """The card's first golden probability changed in a copy of the archive: exit 2, one line naming it."""
    from pipeline import artifact as A
    bad = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(exported) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(f"/extra/{A.CARD}"):
                card = json.loads(data)
                p = card["golden"][0]["probability"]
                card["golden"][0]["probability"] = p + 0.01 if p < 0.5 else p - 0.01
                data = json.dumps(card, indent=1).encode()
            dst.writestr(info, data)
    A.read_card(bad)                                     # still a readable card: only the number differs
    r = subprocess.run([sys.executable, "-m", "deepfm.serve", "--model", str(bad), "--port", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("serve: error: ") and "golden row 0" in lines[0], lines[0]
    assert "http://" not in r.stdout + r.stderr


def test_a_missing_model_is_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "deepfm.serve", "--model", str(tmp_path / "none.pt2")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("serve: error: "), r.stderr
