"""A minimal OTLP/gRPC trace receiver: where spans go without a collector.

    python -m dsi.tools.otlp_sink --port 4317 --out spans.jsonl

Accepts what the services export (``--otlp-endpoint http://127.0.0.1:4317``)
and writes one JSON object per span (service, trace/span/parent ids, name,
start/end in epoch nanoseconds, attributes) to ``--out``, or only counts them.
For tests, benchmarks of the tracing overhead, and a quick look at a trace;
a real deployment sends spans to an OpenTelemetry Collector, Jaeger or Tempo.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def spans_of(request: Any) -> list[dict[str, Any]]:
    """Flat span records of an ExportTraceServiceRequest."""
    out = []
    for rs in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    {
                        "service": resource.get("service.name", ""),
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex() or None,
                        "name": s.name,
                        "kind": s.kind,
                        "start_ns": s.start_time_unix_nano,
                        "end_ns": s.end_time_unix_nano,
                        "attributes": {kv.key: _value(kv.value) for kv in s.attributes},
                        "events": [e.name for e in s.events],
                    }
                )
    return out


class Sink:
    """Receives spans on a grpc.aio server; ``on_spans`` gets every batch."""

    def __init__(self, on_spans: Callable[[list[dict[str, Any]]], None]) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.on_spans = on_spans
        self.received = 0
        sink = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            async def Export(self, request, context):
                spans = spans_of(request)
                sink.received += len(spans)
                sink.on_spans(spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        await self.server.start()
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        await self.server.stop(0)


async def _serve(args: argparse.Namespace) -> None:
    out = open(args.out, "a") if args.out else None  # noqa: ASYNC230 - held while serving
    total = 0

    def on_spans(spans: list[dict[str, Any]]) -> None:
        nonlocal total
        total += len(spans)
        if out is not None:
            for s in spans:
                out.write(json.dumps(s) + "\n")
            out.flush()

    sink = Sink(on_spans)
    url = await sink.start(args.host, args.port)
    if args.announce:
        Path(args.announce).write_text(url)  # noqa: ASYNC240 - once, at start-up
    print(f"otlp sink listening on {url}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored there)
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await sink.stop()
        if out is not None:
            out.close()
        print(f"otlp sink: {total} spans received", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsi.tools.otlp_sink", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4317, help="(0 = any free port; default: %(default)s)")
    p.add_argument("--out", help="append every span as a JSON line to this file (default: only count)")
    p.add_argument("--announce", metavar="FILE", help="write the endpoint URL to FILE once listening")
    args = p.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
