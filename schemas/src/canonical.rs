//! The Parsing Canonical Form of an Avro schema, as the Avro specification defines it ("Parsing
//! Canonical Form for Schemas"), and the fingerprint other languages compute from it.
//!
//! The specification's transformations, applied to the schema's JSON:
//! * PRIMITIVES — a primitive in object form (`{"type":"long"}`) becomes its bare name (`"long"`);
//!   this holds for logical types too (`{"type":"long","logicalType":"timestamp-micros"}` is
//!   `"long"`), which is where apache-avro's own canonical form deviates;
//! * FULLNAMES — every name becomes its full name and `namespace` attributes go;
//! * STRIP — only `type`, `name`, `fields`, `symbols`, `items`, `values` and `size` are kept;
//! * ORDER — in that order: `name`, `type`, `fields`, `symbols`, `items`, `values`, `size`;
//! * STRINGS, INTEGERS, WHITESPACE — string literals unescaped, integers bare, no whitespace.
//!
//! A named type is written in full where it is first defined and by its full name afterwards.
//! This is what Java's `SchemaNormalization.parsingFingerprint64` and Python's fastavro compute;
//! the interop tests check it against both.

use std::collections::HashSet;

use apache_avro::rabin::Rabin;
use digest::Digest;
use serde_json::Value as Json;

const PRIMITIVES: [&str; 8] = ["null", "boolean", "int", "long", "float", "double", "bytes", "string"];

/// Why a schema has no canonical form: it is not a well-formed Avro schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an Avro schema: {0}")]
pub struct NotASchema(String);

/// The Parsing Canonical Form of the schema in `json`.
pub fn parsing_canonical_form(json: &str) -> Result<String, NotASchema> {
    let value: Json = serde_json::from_str(json).map_err(|e| NotASchema(e.to_string()))?;
    let mut out = String::with_capacity(json.len() / 2);
    Canonicaliser { defined: HashSet::new() }.write(&value, "", &mut out)?;
    Ok(out)
}

/// CRC-64-AVRO (Rabin) of `canonical_form`, as the little-endian u64 single-object encoding writes.
pub fn rabin_fingerprint(canonical_form: &str) -> u64 {
    let digest = Rabin::digest(canonical_form.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(bytes)
}

/// The fingerprint of the schema in `json`: CRC-64-AVRO of its Parsing Canonical Form.
pub fn fingerprint_of_json(json: &str) -> Result<u64, NotASchema> {
    parsing_canonical_form(json).map(|form| rabin_fingerprint(&form))
}

struct Canonicaliser {
    /// Full names of the named types already written in full.
    defined: HashSet<String>,
}

/// `name` made full in `namespace` (a name with a dot is already full).
fn full_name(name: &str, namespace: &str) -> String {
    if name.contains('.') || namespace.is_empty() { name.to_string() } else { format!("{namespace}.{name}") }
}

fn quoted(text: &str) -> String {
    // serde_json writes non-ASCII characters as UTF-8 and escapes only what JSON requires.
    Json::String(text.to_string()).to_string()
}

impl Canonicaliser {
    fn write(&mut self, schema: &Json, namespace: &str, out: &mut String) -> Result<(), NotASchema> {
        match schema {
            Json::String(name) => {
                if PRIMITIVES.contains(&name.as_str()) {
                    out.push_str(&quoted(name));
                } else {
                    out.push_str(&quoted(&full_name(name, namespace)));
                }
                Ok(())
            }
            Json::Array(branches) => {
                out.push('[');
                for (i, branch) in branches.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.write(branch, namespace, out)?;
                }
                out.push(']');
                Ok(())
            }
            Json::Object(object) => {
                let Some(Json::String(kind)) = object.get("type") else {
                    return match object.get("type") {
                        // `{"type": <a schema>}` is that schema.
                        Some(inner @ (Json::Object(_) | Json::Array(_))) => self.write(inner, namespace, out),
                        _ => Err(NotASchema(format!("an object without a string `type`: {schema}"))),
                    };
                };
                self.write_object(kind, object, namespace, out)
            }
            other => Err(NotASchema(format!("{other} is not a schema"))),
        }
    }

    fn write_object(
        &mut self,
        kind: &str,
        object: &serde_json::Map<String, Json>,
        namespace: &str,
        out: &mut String,
    ) -> Result<(), NotASchema> {
        let missing = |what: &str| NotASchema(format!("a {kind} without `{what}`"));
        match kind {
            "record" | "error" | "enum" | "fixed" => {
                let name = object.get("name").and_then(Json::as_str).ok_or_else(|| missing("name"))?;
                let own_namespace = object.get("namespace").and_then(Json::as_str).unwrap_or(namespace);
                let full = full_name(name, own_namespace);
                // Names nested inside take the namespace of this type's full name.
                let inner_namespace = full.rsplit_once('.').map_or("", |(ns, _)| ns).to_string();
                if !self.defined.insert(full.clone()) {
                    out.push_str(&quoted(&full));
                    return Ok(());
                }
                out.push_str(&format!("{{\"name\":{},\"type\":{}", quoted(&full), quoted(kind)));
                match kind {
                    "enum" => {
                        let symbols = object
                            .get("symbols")
                            .and_then(Json::as_array)
                            .ok_or_else(|| missing("symbols"))?;
                        let symbols: Vec<String> = symbols
                            .iter()
                            .map(|s| s.as_str().map(quoted).ok_or_else(|| missing("string symbols")))
                            .collect::<Result<_, _>>()?;
                        out.push_str(&format!(",\"symbols\":[{}]", symbols.join(",")));
                    }
                    "fixed" => {
                        let size =
                            object.get("size").and_then(Json::as_u64).ok_or_else(|| missing("size"))?;
                        out.push_str(&format!(",\"size\":{size}"));
                    }
                    _ => {
                        let fields =
                            object.get("fields").and_then(Json::as_array).ok_or_else(|| missing("fields"))?;
                        out.push_str(",\"fields\":[");
                        for (i, field) in fields.iter().enumerate() {
                            if i > 0 {
                                out.push(',');
                            }
                            let field_name = field
                                .get("name")
                                .and_then(Json::as_str)
                                .ok_or_else(|| missing("field names"))?;
                            let field_type = field.get("type").ok_or_else(|| missing("field types"))?;
                            out.push_str(&format!("{{\"name\":{},\"type\":", quoted(field_name)));
                            self.write(field_type, &inner_namespace, out)?;
                            out.push('}');
                        }
                        out.push(']');
                    }
                }
                out.push('}');
            }
            "array" => {
                out.push_str("{\"type\":\"array\",\"items\":");
                self.write(object.get("items").ok_or_else(|| missing("items"))?, namespace, out)?;
                out.push('}');
            }
            "map" => {
                out.push_str("{\"type\":\"map\",\"values\":");
                self.write(object.get("values").ok_or_else(|| missing("values"))?, namespace, out)?;
                out.push('}');
            }
            // A primitive (logical or not) in object form, or a reference to a named type.
            name => self.write(&Json::String(name.to_string()), namespace, out)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logical_types_reduce_to_their_bare_primitive() {
        let form = parsing_canonical_form(
            r#"{"type":"record","name":"R","namespace":"a.b","doc":"d","fields":[
                {"name":"id","type":{"type":"string","logicalType":"uuid"},"doc":"x"},
                {"name":"at","type":{"type":"long","logicalType":"timestamp-micros"}},
                {"name":"n","type":{"type":"int"},"default":1}]}"#,
        );
        assert_eq!(
            form.as_deref(),
            Ok(
                r#"{"name":"a.b.R","type":"record","fields":[{"name":"id","type":"string"},{"name":"at","type":"long"},{"name":"n","type":"int"}]}"#
            )
        );
    }

    #[test]
    fn names_become_full_and_a_second_use_is_a_reference() {
        let form = parsing_canonical_form(
            r#"{"type":"record","name":"Outer","namespace":"x","fields":[
                {"name":"a","type":{"type":"enum","name":"E","symbols":["A","B"],"default":"A"}},
                {"name":"b","type":["null","E"]},
                {"name":"c","type":{"type":"record","name":"y.Inner","fields":[
                    {"name":"f","type":{"type":"fixed","name":"F","size":4}}]}},
                {"name":"d","type":{"type":"array","items":"y.F"}},
                {"name":"e","type":{"type":"map","values":{"type":"bytes"}}}]}"#,
        );
        assert_eq!(
            form.as_deref(),
            Ok(concat!(
                r#"{"name":"x.Outer","type":"record","fields":["#,
                r#"{"name":"a","type":{"name":"x.E","type":"enum","symbols":["A","B"]}},"#,
                r#"{"name":"b","type":["null","x.E"]},"#,
                r#"{"name":"c","type":{"name":"y.Inner","type":"record","fields":[{"name":"f","type":{"name":"y.F","type":"fixed","size":4}}]}},"#,
                r#"{"name":"d","type":{"type":"array","items":"y.F"}},"#,
                r#"{"name":"e","type":{"type":"map","values":"bytes"}}]}"#
            ))
        );
    }

    #[test]
    fn the_fingerprint_of_a_primitive_is_the_specifications() {
        // The specification's fingerprint of the empty string is its seed; `"int"`'s differs.
        assert_eq!(rabin_fingerprint(""), 0xc15d_213a_a4d7_a795);
        assert_eq!(fingerprint_of_json(r#"{"type":"int"}"#), fingerprint_of_json(r#""int""#));
    }

    #[test]
    fn malformed_schemas_are_refused() {
        for bad in ["", "42", r#"{"type":"record"}"#, r#"{"type":"enum","name":"E"}"#, r#"{"name":"x"}"#] {
            assert!(parsing_canonical_form(bad).is_err(), "{bad:?}");
        }
    }
}
