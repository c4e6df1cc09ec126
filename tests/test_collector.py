"""The sandbox Segment collector over real HTTP: auth, limits, gzip and injected faults."""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import requests

from pipelines.sandbox.collector import SegmentCollector

KEY = "collector_test_key"


@pytest.fixture
def collector() -> Iterator[SegmentCollector]:
    with SegmentCollector(KEY) as c:
        yield c


def _track(i: int, **extra: Any) -> dict[str, Any]:
    return {"type": "track", "userId": f"cus_{i}", "event": "Order Completed",
            "messageId": f"m{i}", "properties": extra}  # fmt: skip


def _post(
    c: SegmentCollector,
    body: bytes | dict[str, Any],
    key: str = KEY,
    zipped: bool = False,
    path: str = "/v1/batch",
) -> requests.Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Content-Type": "application/json"}
    if zipped:
        data, headers["Content-Encoding"] = gzip.compress(data), "gzip"
    return requests.post(c.base_url + path, data=data, headers=headers, auth=(key, ""), timeout=5)


def test_batch_is_stored_with_gzip_and_counted(collector: SegmentCollector) -> None:
    response = _post(collector, {"batch": [_track(1), _track(2)]}, zipped=True)
    assert response.status_code == 200
    assert _post(collector, {"userId": "cus_3", "traits": {}}, path="/v1/identify").ok
    assert collector.message_ids() == ["m1", "m2", None]
    assert [m["type"] for m in collector.identifies()] == ["identify"]
    assert len(collector.tracks()) == 2
    assert collector.requests == 2 and collector.batch_sizes == [2, 1]
    assert collector.bytes_received > 0


def test_wrong_write_key_gets_200_and_is_dropped(collector: SegmentCollector) -> None:
    assert _post(collector, {"batch": [_track(1)]}, key="wrong").status_code == 200
    assert collector.messages == [] and collector.dropped_wrong_key == 1


def test_limits_answer_400(collector: SegmentCollector) -> None:
    assert (
        _post(collector, b'{"batch": [{"userId": "a", "type": "track", "x": NaN}]}').status_code
        == 400
    )
    assert _post(collector, b"{not json").status_code == 400
    big = {"batch": [_track(i, pad="x" * 20_000) for i in range(30)]}  # ~600 KB
    assert _post(collector, big, zipped=True).status_code == 400
    assert _post(collector, {"batch": [_track(1, pad="x" * 40_000)]}).status_code == 400
    assert (
        _post(collector, {"batch": [{"type": "track", "event": "E", "messageId": "x"}]}).status_code
        == 400
    )
    assert collector.messages == []


def test_injected_statuses_then_recovery(collector: SegmentCollector) -> None:
    collector.inject(status=500, times=1)
    collector.inject(status=429, retry_after=1, times=1)
    assert _post(collector, {"batch": [_track(1)]}).status_code == 500
    limited = _post(collector, {"batch": [_track(1)]})
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
    assert _post(collector, {"batch": [_track(1)]}).status_code == 200
    assert collector.message_ids() == ["m1"]


def test_outage_until_lifted(collector: SegmentCollector) -> None:
    collector.outage(True)
    assert [_post(collector, {"batch": [_track(i)]}).status_code for i in range(3)] == [503] * 3
    collector.outage(False)
    assert _post(collector, {"batch": [_track(9)]}).status_code == 200
    assert collector.message_ids() == ["m9"]


def test_drop_after_receive_stores_but_never_answers(collector: SegmentCollector) -> None:
    collector.drop_after_receive(times=1)
    with pytest.raises(requests.ConnectionError):
        _post(collector, {"batch": [_track(1)]})
    assert collector.message_ids() == ["m1"]
    assert _post(collector, {"batch": [_track(2)]}).status_code == 200


def test_reject_message_ids_refuses_the_whole_batch(collector: SegmentCollector) -> None:
    collector.reject_message_ids = {"m2"}
    assert _post(collector, {"batch": [_track(1), _track(2)]}).status_code == 400
    assert _post(collector, {"batch": [_track(1)]}).status_code == 200
    assert collector.message_ids() == ["m1"]


def test_latency_is_added_to_every_response(collector: SegmentCollector) -> None:
    collector.latency_ms = 100
    started = time.perf_counter()
    _post(collector, {"batch": [_track(1)]})
    assert time.perf_counter() - started >= 0.1
    assert requests.get(collector.base_url + "/_stats", timeout=5).json()["messages"] == 1
