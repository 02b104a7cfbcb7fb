"""Create the worker's default topics on a development broker, if missing.

Production topics are the operator's to create (partitions, replication,
retention); this exists so that `scripts/run.sh` works on a fresh machine.
"""
import os
import sys

from confluent_kafka.admin import AdminClient, NewTopic

TOPICS = [
    "erp.batch-created",
    "erp.batch-quantity-changed",
    "erp.allocation-required",
    "allocation.allocated",
    "allocation.deallocated",
    "allocation.out-of-stock",
    "allocation.dead-letter",
]

admin = AdminClient({"bootstrap.servers": os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")})
existing = set(admin.list_topics(timeout=30).topics)
missing = [t for t in TOPICS if t not in existing]
for topic, future in admin.create_topics([NewTopic(t, 3, 1) for t in missing]).items() if missing else []:
    try:
        future.result(timeout=30)
        print(f"created topic {topic}", file=sys.stderr)
    except Exception as error:  # an instance started meanwhile may have made it
        if "TOPIC_ALREADY_EXISTS" not in str(error):
            raise
