"""Request statistics: counted by each worker, sent to the master with its heartbeat, added
up there for the control socket's `stats` and the Prometheus endpoint (--metrics-bind).

A worker counts only when one of those is on (`RequestStats`), and reports its running
totals once a tick as a STATS frame; the master keeps each worker's last report and adds
those of workers that are gone to `Metrics.gone`, so that every total only grows.
"""

from __future__ import annotations

import bisect
import json
import re
from typing import Any

# Request duration histogram: upper bounds in seconds (Prometheus' defaults), then +Inf.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))
RESTART_REASONS = ("crash", "hang", "max-requests", "memory", "reload")
REFUSED_STATUSES = (400, 408, 413, 414, 431, 501, 505)


class Totals:
    """Requests by method and status class ("GET 2xx"), their durations (a count per
    bucket, and their sum), connections accepted, requests refused by status: of one
    worker, or added up over several by the master."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.duration_sum = 0.0
        self.accepted = 0
        self.refused: dict[str, int] = {}

    def add(self, other: Totals) -> None:
        for key, value in other.requests.items():
            self.requests[key] = self.requests.get(key, 0) + value
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.duration_sum += other.duration_sum
        self.accepted += other.accepted
        for key, value in other.refused.items():
            self.refused[key] = self.refused.get(key, 0) + value


class RequestStats(Totals):
    """One worker's running totals, counted as it serves."""

    def count(self, method: str, status: int, seconds: float) -> None:
        """A request was answered with `status` in `seconds`."""
        key = f"{method if method in METHODS else 'other'} {status // 100}xx"
        self.requests[key] = self.requests.get(key, 0) + 1
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def refuse(self, status: int) -> None:
        """A request was refused before reaching the app (400, 408, 413, 414, 431...)."""
        key = str(status)
        self.refused[key] = self.refused.get(key, 0) + 1

    def payload(self) -> bytes:
        """The totals, for the master (JSON)."""
        return json.dumps({"requests": self.requests, "buckets": self.buckets,
                           "sum": self.duration_sum, "accepted": self.accepted,
                           "refused": self.refused}).encode()


_REQUEST_KEY = re.compile(r"(?:[A-Z]+|other) [1-9]xx")
_STATUS_KEY = re.compile(r"[1-5][0-9][0-9]")


def read_report(payload: bytes, last: Totals) -> Totals:
    """A worker's STATS payload, checked: what RequestStats.payload() writes, with counts
    that are whole numbers no lower than in its `last` report (totals only grow). Raises
    ValueError for anything else (the master then treats the worker's pipe as garbage)."""
    try:
        report = json.loads(payload)
    except RecursionError:
        raise ValueError("nested too deep") from None
    if not isinstance(report, dict) or set(report) != {"requests", "buckets", "sum",
                                                       "accepted", "refused"}:
        raise ValueError("not a report")
    totals = Totals()
    totals.requests = _counts(report["requests"], _REQUEST_KEY, last.requests)
    totals.refused = _counts(report["refused"], _STATUS_KEY, last.refused)
    buckets = report["buckets"]
    if not isinstance(buckets, list) or len(buckets) != len(BUCKETS) + 1:
        raise ValueError("not one count per bucket")
    totals.buckets = [_count(value, old) for value, old in zip(buckets, last.buckets,
                                                                 strict=True)]
    totals.accepted = _count(report["accepted"], last.accepted)
    duration = report["sum"]
    if type(duration) not in (int, float) or not last.duration_sum <= duration < 1e15:
        raise ValueError(f"bad duration sum {duration!r}")
    totals.duration_sum = float(duration)
    return totals


def _counts(values: Any, key: re.Pattern[str], last: dict[str, int]) -> dict[str, int]:
    if not isinstance(values, dict) or len(values) > 100 or not set(last) <= set(values):
        raise ValueError("bad counts")
    for name in values:
        if key.fullmatch(name) is None:
            raise ValueError(f"bad count name {name!r}")
    return {name: _count(value, last.get(name, 0)) for name, value in values.items()}


def _count(value: Any, last: int) -> int:
    if type(value) is not int or not last <= value < 1 << 63:
        raise ValueError(f"bad count {value!r}")
    return value


def summary(totals: Totals) -> dict[str, Any]:
    """What the control socket's `stats` answers."""
    by_class: dict[str, int] = {}
    for key, value in totals.requests.items():
        status_class = key.split(" ", 1)[1]
        by_class[status_class] = by_class.get(status_class, 0) + value
    return {"requests": sum(totals.requests.values()), "by_status": by_class,
            "by_method_and_status": totals.requests, "duration_seconds": {
                "sum": round(totals.duration_sum, 6), "buckets": dict(_cumulative(totals))},
            "connections_accepted": totals.accepted, "refused": totals.refused}


def exposition(totals: Totals, in_flight: int, workers: list[dict[str, Any]],
               restarts: dict[str, int]) -> str:
    """The Prometheus text exposition format (0.0.4) of the server's metrics. `workers`:
    per worker its "number", "heartbeat_age" and "rss_kib" (None if unknown)."""
    out: list[str] = []

    def family(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    family("forkserve_requests_total", "counter", "Requests answered, by method and status "
           "class.", [(f'{{method="{key.split()[0]}",status="{key.split()[1]}"}}', value)
                      for key, value in sorted(totals.requests.items())])
    buckets = _cumulative(totals)
    out.append("# HELP forkserve_request_duration_seconds Time from the request head to the "
               "end of the response.")
    out.append("# TYPE forkserve_request_duration_seconds histogram")
    out.extend(f'forkserve_request_duration_seconds_bucket{{le="{bound}"}} {count}'
               for bound, count in buckets)
    out.append(f"forkserve_request_duration_seconds_sum {_number(totals.duration_sum)}")
    out.append(f"forkserve_request_duration_seconds_count {buckets[-1][1]}")
    family("forkserve_requests_in_flight", "gauge", "Requests being answered now.",
           [("", in_flight)])
    family("forkserve_requests_refused_total", "counter", "Requests refused before the app, "
           "by status.", [(f'{{status="{key}"}}', totals.refused.get(key, 0))
                          for key in map(str, REFUSED_STATUSES)])
    family("forkserve_connections_accepted_total", "counter", "Client connections accepted.",
           [("", totals.accepted)])
    family("forkserve_workers", "gauge", "Workers running.", [("", len(workers))])
    family("forkserve_worker_restarts_total", "counter", "Workers replaced, by reason.",
           [(f'{{reason="{reason}"}}', restarts.get(reason, 0))
            for reason in RESTART_REASONS])
    family("forkserve_worker_heartbeat_age_seconds", "gauge", "Seconds since each worker was "
           "last heard from.", [(f'{{worker="{w["number"]}"}}', w["heartbeat_age"])
                                for w in workers])
    family("forkserve_worker_resident_memory_bytes", "gauge", "Resident memory of each "
           "worker.", [(f'{{worker="{w["number"]}"}}', w["rss_kib"] * 1024)
                       for w in workers if w["rss_kib"] is not None])
    return "\n".join(out) + "\n"


def _cumulative(totals: Totals) -> list[tuple[str, int]]:
    """The duration histogram as (upper bound, requests up to it), "+Inf" last."""
    cumulative, buckets = 0, []
    for bound, count in zip((*map(str, BUCKETS), "+Inf"), totals.buckets, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return buckets


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
