"""Reads trialflow's output topics and decodes every message with fastavro, as a team outside
trialflow would (schemas/INTEROP.md, "Reading the output topics"): check the C3 01 marker, look
the writer schema up by its fingerprint, resolve the datum into the current schema of that event.

    .tools/interop/venv/bin/python interop/python/consume.py \\
        --topics epro.responses.v1,monitoring.alerts.v1 --expect 10

Reads every partition from its beginning (assign, no consumer group: nothing is committed) and
prints one JSON line per message: topic, partition, offset, key, headers, fingerprint, event and
the decoded value (uuids as text, instants as ISO 8601). A message it cannot decode is printed
with an "error" instead. Stops after --expect messages (exit 0) or after --timeout seconds
(exit 1).
"""
import argparse
import datetime
import json
import sys
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from single_object import Schemas


def plain(value):
    if isinstance(value, (uuid.UUID, datetime.datetime, datetime.date)):
        return str(value) if isinstance(value, uuid.UUID) else value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap-servers", default="127.0.0.1:19092")
    p.add_argument("--topics", required=True, help="comma-separated, full names (with any prefix)")
    p.add_argument("--expect", type=int, required=True, help="stop after this many messages")
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()

    schemas = Schemas()
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap_servers,
            # librdkafka wants a group id even for assigned partitions; nothing is committed.
            "group.id": f"interop-python-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    partitions = []
    for topic in args.topics.split(","):
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        if metadata.error is not None:
            raise KafkaException(metadata.error)
        partitions += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(metadata.partitions)]
    consumer.assign(partitions)

    seen = 0
    deadline = time.monotonic() + args.timeout
    while seen < args.expect and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            print(f"consumer error: {msg.error()}", file=sys.stderr)
            continue
        line = {
            "topic": msg.topic(),
            "partition": msg.partition(),
            "offset": msg.offset(),
            "key": msg.key().decode("utf-8", "replace") if msg.key() is not None else None,
            "headers": {k: v.decode("utf-8", "replace") for k, v in (msg.headers() or []) if v is not None},
        }
        try:
            name, fp, record = schemas.decode(msg.value())
            line.update(event=name, fingerprint=fp, value=record)
        except Exception as e:  # noqa: BLE001 - every undecodable message is reported, none stops the reader
            line["error"] = str(e)
        print(json.dumps(line, default=plain), flush=True)
        seen += 1
    consumer.close()
    if seen < args.expect:
        print(f"read {seen} of {args.expect} messages within {args.timeout} s", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
