"""Request ids in the logs: one request followed by its ``shoal.request``
lines (``cluster/request_log.py``) across a move, on the router (the real
``Router`` over the FAKE fleet) and on the engine worker's stream
(``run_stream`` over a fake shell). No Ray cluster. The front door's lines
and the whole chain across real processes are checked end to end in
``tests/test_front_door.py``."""

from __future__ import annotations

import asyncio
import logging
import re

from cluster.engine.request_stream import InflightRequest, RequestTracker, run_stream
from cluster.request_log import request_event
from tests.test_control_fake import GREEDY, PROMPT, collect, expected, run


def events(caplog, request_id: str) -> list[dict[str, str]]:
    """The parsed key=value lines that carry ``request_id``."""
    out = []
    for r in caplog.records:
        if r.name == "shoal.request" and f"request_id={request_id}" in r.getMessage():
            out.append(dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', r.getMessage())))
    return out


def test_values_cannot_split_a_line_or_forge_a_field(caplog):
    caplog.set_level(logging.INFO, logger="shoal.request")
    request_event("refused", "r1", model="evil\nevent=finished x=1", status=404)
    [line] = [r.getMessage() for r in caplog.records]
    [fields] = events(caplog, "r1")
    assert "\n" not in line and fields["event"] == "refused" and "x" not in fields
    assert fields["status"] == "404" and fields["model"].startswith('"evil')


def test_the_router_logs_the_device_and_the_resume_of_a_moved_request(caplog):
    caplog.set_level(logging.INFO, logger="shoal.request")

    async def scenario(c, fleet, router):
        await c.load("a", "cheap")
        stream = router.stream("a", PROMPT, sampling=GREEDY, request_id="req-42")
        head = [await stream.__anext__()]
        await c.migrate("a", "dear")
        ids, rest = await collect(stream)
        assert [t for ch in head + rest for t in ch["token_ids"]] == expected("a")
    run(scenario)
    lines = events(caplog, "req-42")
    assert [(e["event"], e["device"], e.get("cause")) for e in lines] == [
        ("routed", "cheap", None), ("resumed", "dear", "moved")]
    assert all(e["model"] == "a" for e in lines)
    assert int(lines[1]["generated"]) >= 1  # resumed after the tokens already sent


class _Out:
    def __init__(self, token: int, finished: bool):
        self.outputs = [type("Completion", (), {
            "token_ids": [token], "text": "", "finish_reason": "length" if finished else None,
            "stop_reason": None, "logprobs": None})()]
        self.finished, self.num_cached_tokens = finished, 0


class FakeShell:
    """Makes tokens 0, 1, 2, ... up to ``max_tokens``, one per step."""

    def __init__(self):
        self.aborted: list[str] = []

    async def generate(self, ids, params, request_id):
        for i in range(params.max_tokens):
            await asyncio.sleep(0.01)
            yield _Out(i, i == params.max_tokens - 1)

    async def abort(self, request_id):
        self.aborted.append(request_id)


def test_the_worker_logs_start_move_resume_and_finish_under_one_id(caplog):
    """The worker's side of a move: ``started``, ``moved`` when evacuated,
    then on the next copy ``started`` with the tokens it resumes from and
    ``finished``; every line with the same id and its device."""
    caplog.set_level(logging.INFO, logger="shoal.request")

    async def main():
        sampling = {"max_tokens": 6, "temperature": 0}
        src, dst = RequestTracker(), RequestTracker()
        req = InflightRequest("cmpl-abc-0-1234", "m", [1, 2, 3], sampling)
        got = []
        async for chunk in run_stream(src, FakeShell(), 512, req, [], device="gpu-0"):
            got += chunk["token_ids"]
            if not chunk.get("moved") and not src.inflight["cmpl-abc-0-1234"].moved:
                await src.move_model("m", lambda rid: None)
        again = InflightRequest("cmpl-abc-0-1234", "m", [1, 2, 3], sampling)
        async for chunk in run_stream(dst, FakeShell(), 512, again, got, device="gpu-1"):
            pass
        return got
    got = asyncio.run(main())
    lines = events(caplog, "cmpl-abc-0-1234")
    assert [(e["event"], e["device"]) for e in lines] == [
        ("started", "gpu-0"), ("moved", "gpu-0"), ("started", "gpu-1"), ("finished", "gpu-1")]
    assert lines[2]["resumed_from"] == str(len(got)) and lines[3]["generated"] == "6"
