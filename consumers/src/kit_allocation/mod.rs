//! The kit-allocation consumer's domain rules (RTSM/IRT dispensing). The consumer itself arrives with
//! its issue; the rules it applies are here.

pub mod rules;
