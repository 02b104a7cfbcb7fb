#!/usr/bin/env python3
"""When each batch of a topic held its products' locks, from a worker's log.

Usage: scripts/lock-holds.py WORKER_LOG [TOPIC_SUBSTRING]

The log must come from a worker run with
`RUST_LOG=info,allocation_worker::service_layer::chunk=debug,allocation_worker::adapters::postgres::unit_of_work=debug`
(the bench: `BENCH_RUST_LOG=...` and `--keep`; its log is
/bench-logs/worker-<hex>.log). TOPIC_SUBSTRING (default `quantity`) picks
the batches of one inbound topic.

For each batch attempt it prints when, relative to the first, the attempt
began, when it had its locks (`locked`: after the lock statement and the
read of the lines quantity drops free), and when it had committed, with
how long its writes took. A batch holds its products' locks from within its
lock statement until its commit, so `locked`..`committed` is a lower bound
on each hold. It then says whether any two holds overlapped: when none did,
the batches ran one after the other, and the sum of the holds bounds the
phase's length from below.
"""

import datetime
import re
import sys

UNITS = {"s": 1000.0, "ms": 1.0, "µs": 0.001, "ns": 0.000001}


def millis(text):
    match = re.fullmatch(r"([0-9.]+)(s|ms|µs|ns)", text)
    if match is None:
        raise ValueError(f"not a duration: {text}")
    return float(match.group(1)) * UNITS[match.group(2)]


def field(line, name):
    match = re.search(rf"\b{name}=([^\s}}]+)", line)
    if match is None:
        raise ValueError(f"no {name}= in: {line.strip()}")
    return match.group(1)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    topic = sys.argv[2] if len(sys.argv) > 2 else "quantity"
    writes = {}
    holds = []
    with open(sys.argv[1], encoding="utf-8") as log:
        for line in log:
            span = re.search(r"batch\{[^}]*\}", line)
            if span is None or topic not in span.group(0):
                continue
            if "batch writes" in line:
                writes[span.group(0)] = millis(field(line, "saved"))
            elif "batch attempt timings" in line:
                stamp = line.split()[0].replace("Z", "+00:00")
                end = datetime.datetime.fromisoformat(stamp).timestamp() * 1000
                committed = millis(field(line, "committed"))
                start = end - committed
                holds.append(
                    {
                        "start": start,
                        "locked": start + millis(field(line, "locked")),
                        "end": end,
                        "partition": field(line, "partition"),
                        "size": int(field(line, "size")),
                        "writes": writes.pop(span.group(0), None),
                    }
                )
    if not holds:
        sys.exit(f"no batch attempt timings for topic *{topic}* in {sys.argv[1]}")
    holds.sort(key=lambda h: h["locked"])
    origin = min(h["start"] for h in holds)
    print("partition  messages   began  locked  committed  writes (ms from the first batch)")
    for h in holds:
        writes_ms = "-" if h["writes"] is None else f"{h['writes']:.1f}"
        print(
            f"{h['partition']:>9}  {h['size']:>8}  {h['start'] - origin:6.1f}"
            f"  {h['locked'] - origin:6.1f}  {h['end'] - origin:9.1f}  {writes_ms:>6}"
        )
    overlaps = sum(
        1 for earlier, later in zip(holds, holds[1:]) if later["locked"] < earlier["end"]
    )
    held = sum(h["end"] - h["locked"] for h in holds)
    written = sum(h["writes"] or 0.0 for h in holds)
    messages = sum(h["size"] for h in holds)
    span_ms = max(h["end"] for h in holds) - origin
    print(
        f"{len(holds)} batches, {messages} messages, over {span_ms:.1f} ms; "
        f"holds (locked..committed) summed {held:.1f} ms, writes {written:.1f} ms; "
        f"{overlaps} of {len(holds) - 1} consecutive holds overlapped"
    )
    if messages:
        print(f"held per message: {held * 1000 / messages:.1f} µs")


if __name__ == "__main__":
    main()
