#!/usr/bin/env python3
"""Splits the latency run of a kept benchmark into its two halves.

Usage: scripts/bench.sh --keep [...]; then
       python3 scripts/latency-breakdown.py <hex suffix of the kept run>

For every line of the latency run (orderid "lat-..."), it reads the Kafka
timestamp of the inbound message and of its outbound decision from the kept
topics, and the start of the worker transaction that decided it (outbox
created_at) from the kept database, and prints percentiles of:
  inbound  = transaction start - inbound timestamp (producer linger, broker,
             fetch, waiting in the partition's queue);
  outbound = outbound timestamp - transaction start (the transaction, then
             waiting for the relay's next pass).
Needs confluent-kafka (pip) and psql; uses KAFKA_BOOTSTRAP_SERVERS and
DATABASE_URL like the benchmark.
"""
import json
import os
import subprocess
import sys
from urllib.parse import urlsplit, urlunsplit

from confluent_kafka import Consumer, TopicPartition


def read_topic(bootstrap, topic):
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "latency-breakdown-" + topic,
        "enable.auto.commit": False,
        "fetch.wait.max.ms": 10,
    })
    metadata = consumer.list_topics(topic, timeout=10)
    if topic not in metadata.topics or metadata.topics[topic].error:
        sys.exit(f"topic {topic} not found: was the run kept (--keep)?")
    consumer.assign([TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions])
    messages, idle = [], 0
    while idle < 20:  # 4 s without a message: the end of a kept topic
        m = consumer.poll(0.2)
        if m is None:
            idle += 1
        elif not m.error():
            idle = 0
            messages.append(m)
    consumer.close()
    return messages


def percentiles(values):
    values = sorted(values)
    n = len(values)
    at = lambda q: values[min(n - 1, int(n * q))]
    return f"p50 {at(0.5):6.1f}  p90 {at(0.9):6.1f}  p99 {at(0.99):6.1f}  max {values[-1]:6.1f} ms"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    suffix = sys.argv[1]
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    url = urlsplit(os.environ["DATABASE_URL"])
    database = urlunsplit(url._replace(path=f"/aw_bench_{suffix}"))

    inbound = {}
    for m in read_topic(bootstrap, f"erp.allocation-required.{suffix}"):
        orderid = json.loads(m.value()).get("orderid", "")
        if orderid.startswith("lat-"):
            inbound[orderid] = m.timestamp()[1]
    outbound = {}
    for topic in ("allocation.allocated", "allocation.out-of-stock"):
        for m in read_topic(bootstrap, f"{topic}.{suffix}"):
            orderid = json.loads(m.value())["orderid"]
            if orderid in inbound:
                outbound[orderid] = m.timestamp()[1]
    rows = subprocess.run(
        ["psql", "-qAt", "-F", "|", database, "-c",
         "SELECT convert_from(payload, 'UTF8')::json->>'orderid', "
         "(extract(epoch FROM created_at) * 1000)::bigint FROM outbox "
         "WHERE kind IN ('Allocated', 'OutOfStock')"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    started = {}
    for row in rows:
        orderid, at = row.split("|")
        if orderid in inbound:
            started[orderid] = int(at)

    lines = [o for o in inbound if o in outbound and o in started]
    print(f"{len(lines)} lines of the latency run")
    print("end to end (outbound ts - inbound ts)   ", percentiles([outbound[o] - inbound[o] for o in lines]))
    print("inbound (transaction start - inbound ts)", percentiles([started[o] - inbound[o] for o in lines]))
    print("outbound (outbound ts - transaction start)", percentiles([outbound[o] - started[o] for o in lines]))


if __name__ == "__main__":
    main()
