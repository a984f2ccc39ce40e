"""fastavro's view of our schemas, for the fingerprint test (schemas/tests/reference_fingerprints.rs).

For each .avsc file given, one line `<file> TAB <Parsing Canonical Form> TAB <fingerprint hex>`:
fastavro's canonical form and its CRC-64-AVRO fingerprint (8 bytes, little-endian, as single-object
encoding writes it).

Run: .tools/interop/venv/bin/python interop/python/fingerprints.py schemas/avro/*/*.avsc
"""
import json
import sys

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        schema = fastavro.parse_schema(json.load(f))
    form = to_parsing_canonical_form(schema)
    print(f"{path}\t{form}\t{fingerprint(form, 'CRC-64-AVRO')}")
