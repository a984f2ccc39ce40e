use std::fmt;

use crate::error::{OutboxError, Result};

/// The name of a service schema that owns an outbox ("an outbox source").
///
/// Outbox SQL is built with the schema name spliced in (one table per service schema), so the name
/// is validated once here to a plain identifier that needs no quoting.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SchemaName(String);

impl SchemaName {
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let mut chars = name.chars();
        let valid_start = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let valid_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid_start && valid_rest && name.len() <= 63 && !name.starts_with("pg_") {
            Ok(Self(name))
        } else {
            Err(OutboxError::InvalidSchemaName(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SchemaName {
    type Err = OutboxError;

    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_identifiers() {
        for ok in ["enrollment", "kit_allocation", "_x", "epro2"] {
            assert_eq!(SchemaName::new(ok).map(|s| s.to_string()).ok(), Some(ok.to_string()));
        }
    }

    #[test]
    fn rejects_anything_that_would_need_quoting() {
        for bad in ["", "Enrollment", "2fa", "a-b", "a;drop table x", "a b", "pg_catalog", &"x".repeat(64)] {
            assert!(SchemaName::new(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
