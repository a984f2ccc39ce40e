//! The enrollment consumer's domain rules. The consumer itself (gates, saga with kit allocation)
//! arrives with its issue; the randomization list it draws from is here.

pub mod randomization;
