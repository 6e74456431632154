"""python -m deepfm.serve --model model.pt2 [--host 127.0.0.1] [--port 8080] [--threads N] [--max-rows 10000]

The online predictor over HTTP: an ASGI app (Starlette) served by uvicorn around one
:class:`deepfm.serving.Predictor`, loaded once at start with its golden-set check (a model that fails it
never serves: exit 2 and one line on stderr).

    POST /predict   {"rows": [{"I1": "5", "C1": "68fd1e64"}, {"I1": 3}]}
                    -> 200 {"model": FINGERPRINT, "probabilities": [0.0321..., 0.0158...]}
                    a value the featurize job would reject -> 400 {"error": "row 1: I1: 'five' is not a number ..."}
                    not JSON, or not {"rows": [object, ...]} -> 400; more than --max-rows rows -> 413
    GET  /health    -> 200 {"status": "ok", "model": FINGERPRINT, "model_name": "deepfm", "feature_fingerprint",
                    "created", "contract", "fields", "checkpoint", "global_step", "neg_sample_rate", ...}

Rows are raw values as they appear in the logs (text or numbers; "" / null / absent = missing), with the
featurize job's parse and id rules (pipeline.rows); keys that are not fields of the model are ignored.
Every response, errors included, carries the model's fingerprint in the ``X-Model-Fingerprint`` header
(and in the JSON body's ``model``), so a caller always knows which model a score came from.
Probabilities are float64, written with Python's shortest round-trip repr: a client reading them gets
exactly what ``Predictor.predict`` returned.

Threads. The event loop only reads bodies and writes responses; the rest of a request (JSON parse, the
featurizer, the graph, the JSON of the answer) runs in a pool of ``--threads`` worker threads (default:
the cores this process may use), so a long batch never stalls /health or other connections. torch's
intra-op pool is set to ``--torch-threads`` (default 1). A request's batch is small (1 to a few hundred
rows): its graph is too short an op for intra-op parallelism to pay for its fork/join, and most of a
request is Python that holds the GIL (the featurizer: ~80% of a 256-row predict; uvicorn's HTTP parsing;
JSON), so the way to use the cores is requests side by side: torch releases the GIL inside its ops, so
one request's graph runs while another is featurized. Measured on 2 shared cores with the paper-size
model (benchmarks/serve_bench.py): --torch-threads 2 made the 256-row graph 6x slower (2.8 -> 17.6 ms,
the two pools oversubscribing the cores); --threads 1, 2 and 4 were within the noise of each other.
Keep threads x torch threads <= the cores; raise --torch-threads only for few, large batches
(thousands of rows a request). The GIL bounds one process to about one core's worth of Python: more
throughput needs more processes (one per core, each with its own model, behind a balancer).

Logs: one start line (model, fingerprint, address); uvicorn's own at WARNING and no access log unless
``--access-log``. With ``--port 0`` the system picks a free port, which the start line names.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Mapping, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepfm.serving import Predictor
from pipeline.artifact import ArtifactError

log = logging.getLogger("deepfm.serve")

DEFAULT_MAX_ROWS = 10_000
FINGERPRINT_HEADER = "X-Model-Fingerprint"
BYTES_PER_ROW = 16 * 1024          # the body limit: this much per allowed row, plus 1 MiB
SHAPE = 'expected a JSON object {"rows": [{field: value, ...}, ...]}'


class RequestError(Exception):
    """A request the service refuses: its HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:              # not Linux
        return os.cpu_count() or 1


def parse_rows(body: bytes, max_rows: int) -> list[Mapping[str, Any]]:
    """A /predict body -> its rows; :class:`RequestError` 400 for what is not ``{"rows": [object, ...]}``
    and 413 for more than ``max_rows`` rows."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not JSON ({e}); {SHAPE}") from None
    except RecursionError:
        raise RequestError(400, f"the body nests too deep; {SHAPE}") from None
    if not isinstance(doc, dict) or "rows" not in doc:
        raise RequestError(400, f"{SHAPE}, got {_kind(doc)}" + ("" if not isinstance(doc, dict) else " without rows"))
    rows = doc["rows"]
    if not isinstance(rows, list):
        raise RequestError(400, f"rows: {SHAPE}, got rows as {_kind(rows)}")
    if len(rows) > max_rows:
        raise RequestError(413, f"{len(rows)} rows; at most {max_rows} a request (--max-rows)")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise RequestError(400, f"row {i}: expected an object of field -> value, got {_kind(r)}")
    return rows


def _kind(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


def health_doc(p: Predictor) -> dict[str, Any]:
    """What GET /health answers: the model card's identity (not its golden set or settings)."""
    c = p.card
    return {"status": "ok", "model": c.model_fingerprint, "model_name": c.model,
            "feature_fingerprint": c.feature_fingerprint, "created": c.created,
            "contract": c.manifest.contract.name, "fields": list(c.field_names),
            "checkpoint": c.checkpoint, "global_step": c.global_step, "neg_sample_rate": c.neg_sample_rate,
            "torch_version": c.torch_version, "metrics": c.metrics.get("test") or c.metrics.get("valid"),
            "path": str(p.path)}


class FingerprintHeader:
    """ASGI middleware: the model's fingerprint header on every HTTP response (404s, 405s and 500s too)."""

    def __init__(self, app: ASGIApp, fingerprint: str):
        self.app = app
        self.header = (FINGERPRINT_HEADER.lower().encode(), fingerprint.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


def make_app(predictor: Predictor, max_rows: int = DEFAULT_MAX_ROWS, threads: int | None = None,
             max_body_bytes: int | None = None) -> Starlette:
    """The service around ``predictor``: /predict and /health (see the module docstring). ``threads``:
    the worker threads that run the requests' featurizing and inference (default: the cores); the pool
    is shut down with the app (its lifespan)."""
    fingerprint = predictor.fingerprint
    max_bytes = max_body_bytes if max_body_bytes is not None else (1 << 20) + BYTES_PER_ROW * max_rows
    executor = ThreadPoolExecutor(threads or available_cores(), thread_name_prefix="predict")
    health = json.dumps(health_doc(predictor)).encode()

    def answer(status: int, doc: Mapping[str, Any]) -> Response:
        return Response(json.dumps(doc).encode(), status, media_type="application/json")

    def error(status: int, message: str) -> Response:
        return answer(status, {"error": message, "model": fingerprint})

    def work(body: bytes) -> tuple[int, bytes]:
        """One /predict body -> (status, JSON bytes); runs in a worker thread."""
        try:
            rows = parse_rows(body, max_rows)
            probabilities = predictor.predict(rows)
        except RequestError as e:
            return e.status, json.dumps({"error": e.message, "model": fingerprint}).encode()
        except ValueError as e:               # a value the featurize job would reject: names row and field
            return 400, json.dumps({"error": str(e), "model": fingerprint}).encode()
        return 200, json.dumps({"model": fingerprint, "probabilities": probabilities.tolist()}).encode()

    async def read_body(request: Request) -> bytes | Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return error(413, f"a body of {length} bytes; at most {max_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                return error(413, f"a body of more than {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def predict(request: Request) -> Response:
        body = await read_body(request)
        if isinstance(body, Response):
            return body
        try:
            status, payload = await asyncio.get_running_loop().run_in_executor(executor, work, body)
        except Exception as e:                # a failure of the model itself: logged, and a 500 naming it
            log.exception("predict failed")
            return error(500, f"{type(e).__name__}: {e}")
        return Response(payload, status, media_type="application/json")

    async def get_health(request: Request) -> Response:
        return Response(health, 200, media_type="application/json")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        r = error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        if exc.headers:
            r.headers.update(exc.headers)
        return r

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            executor.shutdown(wait=True, cancel_futures=True)

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]),
                            Route("/health", get_health, methods=["GET"])],
                    exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.add_middleware(FingerprintHeader, fingerprint=fingerprint)
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: one the system picks); OSError when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and the
    # accepted ones inherit it. Without it uvicorn's two writes of an answer (head, body) meet Nagle's
    # algorithm and the client's delayed ACK: every request took 40 ms more.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, force=True, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("deepfm").setLevel(logging.INFO)
    p = argparse.ArgumentParser(prog="python -m deepfm.serve", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, help="an exported model (python -m deepfm.export)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="the port (default 8080; 0: a free one, logged)")
    p.add_argument("--threads", type=int, default=None,
                   help="requests featurized and scored at once, in worker threads (default: the cores)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads for each of them (default 1; see the module docstring)")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS,
                   help=f"rows allowed in one request; more is 413 (default {DEFAULT_MAX_ROWS})")
    p.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    a = p.parse_args(argv)
    for flag, v in (("--threads", a.threads), ("--torch-threads", a.torch_threads), ("--max-rows", a.max_rows)):
        if v is not None and v < 1:
            p.error(f"{flag} must be at least 1")

    import torch
    import uvicorn
    torch.set_num_threads(a.torch_threads)
    threads = a.threads or available_cores()
    t0 = time.perf_counter()
    try:
        predictor = Predictor.load(a.model)            # the golden set is checked here
    except (ArtifactError, ValueError, OSError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 2
    try:
        sock = listen(a.host, a.port)
    except OSError as e:
        print(f"serve: error: cannot listen on {a.host}:{a.port}: {e}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    app = make_app(predictor, a.max_rows, threads)
    config = uvicorn.Config(app, log_config=None, log_level="info" if a.access_log else "warning",
                            access_log=a.access_log, lifespan="on", timeout_graceful_shutdown=10)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s (%s, fingerprint %s, %d golden rows checked, loaded in %.1f s) on http://%s:%d: "
             "%d threads x %d torch threads, at most %d rows a request", a.model, predictor.card.model,
             predictor.fingerprint, len(predictor.card.golden), time.perf_counter() - t0, shown, port,
             threads, a.torch_threads, a.max_rows)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
