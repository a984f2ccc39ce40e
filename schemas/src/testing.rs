//! Strategies for the property tests.

use proptest::prelude::*;
use uuid::Uuid;

pub(crate) fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

pub(crate) fn opt_uuid() -> impl Strategy<Value = Option<Uuid>> {
    proptest::option::of(uuid())
}

/// Doubles that equal themselves (NaN never does, so it cannot round-trip through `==`).
pub(crate) fn finite() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("finite", |f| f.is_finite())
}

pub(crate) fn opt_finite() -> impl Strategy<Value = Option<f64>> {
    proptest::option::of(finite())
}
