"""Cross-checks the test vectors with the Apache Avro Python library (an independent encoder).

For every vector: the fingerprint Python computes for the schema file equals the published one,
Python decodes the datum after the 10-byte header, and re-encodes it to the very same bytes.
Run with `make interop` (installs the `avro` package into .tools/venv).
"""
import io
import json
import pathlib
import sys

import avro.io
import avro.schema

ROOT = pathlib.Path(__file__).resolve().parents[2]
vectors = json.loads((ROOT / "schemas/test-vectors/single-object.json").read_text())

failures = 0
for name, entry in vectors["fingerprints"].items():
    schema = avro.schema.parse((ROOT / entry["schema"]).read_text())
    if schema.fingerprint("CRC-64-AVRO").hex() != entry["fingerprint_le_bytes_hex"]:
        print(f"FAIL {name}: fingerprint differs")
        failures += 1
for v in vectors["vectors"]:
    schema = avro.schema.parse((ROOT / v["schema"]).read_text())
    data = bytes.fromhex(v["single_object_hex"])
    datum = avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(io.BytesIO(data[10:])))
    out = io.BytesIO()
    avro.io.DatumWriter(schema).write(datum, avro.io.BinaryEncoder(out))
    ok = data[:2] == b"\xc3\x01" and data[2:10].hex() == v["fingerprint_le_bytes_hex"] and out.getvalue() == data[10:]
    print(("ok  " if ok else "FAIL"), v["event"])
    failures += 0 if ok else 1
print(f"{len(vectors['vectors']) + len(vectors['fingerprints']) - failures} passed, {failures} failed")
sys.exit(1 if failures else 0)
