"""Avro single-object encoding of trialflow events with fastavro, written from schemas/INTEROP.md
as a team outside trialflow would write it: the schemas are the .avsc files, the fingerprint is
fastavro's CRC-64-AVRO of the Parsing Canonical Form, nothing of trialflow's code is used.

    C3 01 | fingerprint (8 bytes, little-endian) | Avro binary datum
"""
import io
import json
import pathlib

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

ROOT = pathlib.Path(__file__).resolve().parents[2]
MARKER = b"\xc3\x01"
CONTENT_TYPE = "application/vnd.apache.avro+single-object"

# The input topics (INTEROP.md, "Topics and keys"): every one is keyed by the subject id.
INPUT_TOPICS = {
    "VitalSignRecorded": "clinical.observations.v1",
    "AdverseEventReported": "safety.adverse-events.v1",
    "QuestionnaireResponseSubmitted": "epro.submissions.v1",
}


class UnknownFingerprint(Exception):
    pass


def _parse(path):
    # Each file is self-contained (shared types inlined), so each is parsed on its own.
    return fastavro.parse_schema(json.loads(path.read_text()), named_schemas={})


def _fingerprint(parsed):
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


class Schemas:
    """The current schema of every event (the reader schemas) and every schema trialflow ever
    wrote with (current and released), by fingerprint (the writer schemas)."""

    def __init__(self, root=ROOT):
        self.current = {}  # record name -> parsed schema
        self.writers = {}  # fingerprint bytes -> (record name, parsed schema)
        for path in sorted((root / "schemas/avro").rglob("*.avsc")):
            if path.parent.name == "common":
                continue  # the shared types, embedded in every event
            parsed = _parse(path)
            name = parsed["name"].rsplit(".", 1)[-1]
            self.current[name] = parsed
            self.writers[_fingerprint(parsed)] = (name, parsed)
        for path in sorted((root / "schemas/released").rglob("*.avsc")):
            if path.parent.name == "common":
                continue
            parsed = _parse(path)
            self.writers.setdefault(_fingerprint(parsed), (parsed["name"].rsplit(".", 1)[-1], parsed))
        # Records trialflow wrote before its fingerprints followed the specification carry the
        # legacy fingerprint of the same schema (test-vectors: legacy_fingerprint_le_bytes_hex).
        vectors = json.loads((root / "schemas/test-vectors/single-object.json").read_text())
        for name, entry in vectors["fingerprints"].items():
            legacy = entry.get("legacy_fingerprint_le_bytes_hex")
            if legacy and name in self.current:
                self.writers.setdefault(bytes.fromhex(legacy), (name, self.current[name]))

    def fingerprint(self, name):
        return _fingerprint(self.current[name])

    def encode(self, name, record):
        out = io.BytesIO()
        out.write(MARKER)
        out.write(self.fingerprint(name))
        fastavro.schemaless_writer(out, self.current[name], record)
        return out.getvalue()

    def decode(self, payload):
        """(record name, fingerprint hex, record) of a single-object encoded message: the writer
        schema found by fingerprint, the datum resolved into the current schema of that name."""
        if payload is None or len(payload) < 10 or payload[:2] != MARKER:
            raise ValueError("not Avro single-object encoded (no C3 01 marker)")
        fp = payload[2:10]
        if fp not in self.writers:
            raise UnknownFingerprint(f"unknown schema fingerprint {fp.hex()}")
        name, writer = self.writers[fp]
        reader = self.current.get(name, writer)
        record = fastavro.schemaless_reader(io.BytesIO(payload[10:]), writer, reader)
        return name, fp.hex(), record


def load_example(name, root=ROOT):
    """The example message of `name` from interop/examples (the field values, as INTEROP.md shows them)."""
    return json.loads((root / "interop/examples" / f"{name}.json").read_text())
