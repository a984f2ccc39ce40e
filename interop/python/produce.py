"""Publishes the example input events of interop/examples to trialflow's input topics, as an EDC
integration or a patient app outside trialflow would (schemas/INTEROP.md): Avro single-object
encoded with fastavro, keyed by the subject id, murmur2-partitioned, with the documented headers.

    .tools/interop/venv/bin/python interop/python/produce.py --bootstrap-servers 127.0.0.1:19092

Prints one JSON line per acknowledged message (event, topic, key, partition, offset, event_id,
submission_id); exits 1 if any message was not acknowledged. Options for tests:
  --subject S        send the examples for subject S instead of the one in the files
  --new-ids          fresh event ids (and submission id): the examples as new events
  --only E[,E]       only these events (record names)
  --topic-prefix P   the deployment's topic prefix (trialflow's TOPIC_PREFIX)
  --omit-header H    leave header H out (repeatable)
  --header H=V       set header H to V instead of the documented value (repeatable)
  --print-hex        print each event's encoded bytes as hex (event, hex) and send nothing
"""
import argparse
import json
import sys
import uuid

from confluent_kafka import Producer

from single_object import CONTENT_TYPE, INPUT_TOPICS, Schemas, load_example


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap-servers", default="127.0.0.1:19092")
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--subject")
    p.add_argument("--new-ids", action="store_true")
    p.add_argument("--only")
    p.add_argument("--omit-header", action="append", default=[])
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--print-hex", action="store_true")
    args = p.parse_args()

    schemas = Schemas()
    names = args.only.split(",") if args.only else list(INPUT_TOPICS)
    if args.print_hex:
        for name in names:
            print(json.dumps({"event": name, "hex": schemas.encode(name, load_example(name)).hex()}))
        return
    overrides = dict(h.split("=", 1) for h in args.header)
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap_servers,
            # The partition of a key must be the one trialflow's relay and Java clients choose:
            # murmur2 of the key bytes. librdkafka's default (consistent_random, CRC32) is not.
            "partitioner": "murmur2_random",
            "enable.idempotence": True,
            "acks": "all",
        }
    )
    results, failures = [], []

    for name in names:
        event = load_example(name)
        envelope = event["envelope"]
        if args.subject:
            envelope["subject_id"] = args.subject
        if args.new_ids:
            envelope["event_id"] = str(uuid.uuid4())
            if "submission_id" in event:
                event["submission_id"] = str(uuid.uuid4())
        headers = {
            "content-type": CONTENT_TYPE,
            "event_type": name,
            "event_id": envelope["event_id"],
        }
        headers.update(overrides)
        for h in args.omit_header:
            headers.pop(h, None)
        topic = args.topic_prefix + INPUT_TOPICS[name]
        key = envelope["subject_id"]
        sent = {"event": name, "topic": topic, "key": key, "event_id": envelope["event_id"]}
        if "submission_id" in event:
            sent["submission_id"] = event["submission_id"]

        def delivered(err, msg, sent=sent):
            if err is not None:
                failures.append(f"{sent['event']}: {err}")
            else:
                results.append({**sent, "partition": msg.partition(), "offset": msg.offset()})

        producer.produce(
            topic,
            key=key.encode("utf-8"),
            value=schemas.encode(name, event),
            headers=[(k, v.encode("utf-8")) for k, v in headers.items()],
            on_delivery=delivered,
        )
    left = producer.flush(30)
    for r in results:
        print(json.dumps(r), flush=True)
    if failures or left:
        print(f"not acknowledged: {failures or f'{left} messages still queued after 30 s'}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
