#!/usr/bin/env python3
"""How many records a second the broker acknowledges from one producer
shaped like the worker's relay, with nothing else running: the ceiling the
broker itself sets on the benchmark's outbound side.

Usage: python3 scripts/broker-ceiling.py [RECORDS]   (default 100000)

The records are the relay's kind: idempotent, acks=all, linger.ms 0, a JSON
value of about 80 bytes, the six CloudEvents headers, keyed by one of 200
SKUs, over three new topics of three partitions (one per event kind). The
broker's CPU for them is read from /proc when BROKER_PID is set (the PyPI
Tansu of scripts/services.sh writes its pid to .run/tansu.pid). Needs
confluent-kafka (pip); uses KAFKA_BOOTSTRAP_SERVERS like the benchmark.
The topics are left behind: restart the development broker afterwards.
"""
import os
import sys
import time
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic


def broker_cpu_seconds(pid):
    if not pid:
        return None
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime and stime, fields 14 and 15 of stat(5), after the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    records = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    pid = os.environ.get("BROKER_PID")
    tag = uuid.uuid4().hex[:8]
    topics = [f"ceiling.{kind}.{tag}" for kind in ("allocated", "deallocated", "out-of-stock")]
    admin = AdminClient({"bootstrap.servers": servers})
    for future in admin.create_topics([NewTopic(t, 3, 1) for t in topics]).values():
        future.result()
    producer = Producer(
        {
            "bootstrap.servers": servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 0,
            "socket.nagle.disable": True,
        }
    )
    value = b'{"orderid":"order-000123","sku":"SKU-0042","qty":3,"batchref":"batch-0042-2"}'
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"0" * 36),
        ("ce_type", b"allocation.Allocated"),
        ("ce_source", b"allocation-worker"),
        ("ce_time", b"2026-12-07T01:00:00.000000Z"),
        ("content-type", b"application/json"),
    ]
    acknowledged = [0]
    failed = [0]

    def delivered(error, _message):
        if error is None:
            acknowledged[0] += 1
        else:
            failed[0] += 1

    # Untimed: metadata and the producer id.
    producer.produce(topics[0], value, key=b"SKU-0", headers=headers)
    producer.flush()
    cpu_before = broker_cpu_seconds(pid)
    started = time.monotonic()
    for i in range(records):
        while True:
            try:
                producer.produce(
                    topics[i % 3],
                    value,
                    key=b"SKU-%d" % (i % 200),
                    headers=headers,
                    on_delivery=delivered,
                )
                break
            except BufferError:
                producer.poll(0.001)
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush()
    elapsed = time.monotonic() - started
    line = (
        f"{acknowledged[0]} records acknowledged ({failed[0]} failed) in {elapsed:.2f} s"
        f" = {acknowledged[0] / elapsed:,.0f} records/s"
    )
    cpu_after = broker_cpu_seconds(pid)
    if cpu_before is not None and cpu_after is not None and acknowledged[0]:
        per_thousand = (cpu_after - cpu_before) * 1e6 / acknowledged[0]
        line += f"; broker CPU {per_thousand:.1f} ms per 1,000 records"
    print(line)
    return 0 if failed[0] == 0 and acknowledged[0] == records else 1


if __name__ == "__main__":
    sys.exit(main())
