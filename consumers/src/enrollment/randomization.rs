//! Stratified permuted-block randomization lists, generated from a seed at study set-up.
//!
//! One list per stratum. Each list is a sequence of blocks; a block's size is a multiple of the sum
//! of the allocation ratio, drawn at random among the configured multiples (varied block sizes keep
//! the next assignment unpredictable to site staff), and within a block every arm appears exactly
//! `ratio × multiple` times in random order. The same seed and study configuration always give the
//! same lists (the list can be regenerated and audited), and different strata get independent
//! streams.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

/// An arm and its share of the allocation ratio (e.g. 1:1:1, or 2:1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arm {
    pub code: String,
    pub ratio: u32,
}

/// How lists are generated (study configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListSpec {
    /// The study's randomization seed; kept concealed with the lists.
    pub seed: u64,
    pub arms: Vec<Arm>,
    /// Block sizes as multiples of the ratio sum, e.g. `[1, 2]` gives blocks of 3 and 6 for 1:1:1.
    pub block_multiples: Vec<u32>,
    /// Slots per stratum (rounded up to whole blocks).
    pub slots_per_stratum: u32,
}

/// One slot of a stratum's list, in the order slots are handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// 1-based position in the stratum's list.
    pub sequence: u32,
    /// 1-based block the slot belongs to.
    pub block: u32,
    pub arm: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ListError {
    #[error("a randomization list needs at least two arms, got {0}")]
    TooFewArms(usize),
    #[error("arm `{0}` has ratio 0; every arm needs a ratio of at least 1")]
    ZeroRatio(String),
    #[error("arm code `{0}` appears twice")]
    DuplicateArm(String),
    #[error("block_multiples is empty or contains 0: {0:?}")]
    BadBlockMultiples(Vec<u32>),
    #[error("slots_per_stratum must be at least 1")]
    NoSlots,
}

impl ListSpec {
    pub fn validate(&self) -> Result<(), ListError> {
        if self.arms.len() < 2 {
            return Err(ListError::TooFewArms(self.arms.len()));
        }
        let mut codes = std::collections::BTreeSet::new();
        for arm in &self.arms {
            if arm.ratio == 0 {
                return Err(ListError::ZeroRatio(arm.code.clone()));
            }
            if !codes.insert(arm.code.as_str()) {
                return Err(ListError::DuplicateArm(arm.code.clone()));
            }
        }
        if self.block_multiples.is_empty() || self.block_multiples.contains(&0) {
            return Err(ListError::BadBlockMultiples(self.block_multiples.clone()));
        }
        if self.slots_per_stratum == 0 {
            return Err(ListError::NoSlots);
        }
        Ok(())
    }

    fn ratio_sum(&self) -> u32 {
        self.arms.iter().map(|a| a.ratio).sum()
    }
}

/// A stable 64-bit FNV-1a hash: the stratum's part of its stream seed (stable across Rust
/// versions, unlike `DefaultHasher`).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The list of one stratum (e.g. `"AGE>=65|SITE-701"`).
pub fn generate(spec: &ListSpec, stratum: &str) -> Result<Vec<Slot>, ListError> {
    spec.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ fnv1a(stratum));
    let sum = spec.ratio_sum();
    let mut slots = Vec::with_capacity(spec.slots_per_stratum as usize);
    let mut block = 0;
    while slots.len() < spec.slots_per_stratum as usize {
        block += 1;
        let multiple = spec.block_multiples[rng.random_range(0..spec.block_multiples.len())];
        let mut arms: Vec<&str> = Vec::with_capacity((sum * multiple) as usize);
        for arm in &spec.arms {
            arms.extend(std::iter::repeat_n(arm.code.as_str(), (arm.ratio * multiple) as usize));
        }
        arms.shuffle(&mut rng);
        for arm in arms {
            slots.push(Slot { sequence: slots.len() as u32 + 1, block, arm: arm.to_string() });
        }
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn spec(seed: u64) -> ListSpec {
        ListSpec {
            seed,
            arms: vec![
                Arm { code: "PBO".into(), ratio: 1 },
                Arm { code: "XAN_LO".into(), ratio: 1 },
                Arm { code: "XAN_HI".into(), ratio: 2 },
            ],
            block_multiples: vec![1, 2],
            slots_per_stratum: 100,
        }
    }

    fn blocks(slots: &[Slot]) -> BTreeMap<u32, Vec<&str>> {
        let mut blocks: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
        for s in slots {
            blocks.entry(s.block).or_default().push(&s.arm);
        }
        blocks
    }

    #[test]
    fn every_completed_block_has_the_exact_ratio() {
        let slots = generate(&spec(7), "AGE<65").unwrap_or_default();
        for (block, arms) in blocks(&slots) {
            let count = |code: &str| arms.iter().filter(|a| **a == code).count();
            let multiple = arms.len() / 4;
            assert!(
                arms.len() % 4 == 0 && (multiple == 1 || multiple == 2),
                "block {block} has size {}",
                arms.len()
            );
            assert_eq!(
                (count("PBO"), count("XAN_LO"), count("XAN_HI")),
                (multiple, multiple, 2 * multiple),
                "block {block}"
            );
        }
    }

    #[test]
    fn block_sizes_vary_and_lists_cover_the_requested_slots() {
        let slots = generate(&spec(7), "AGE<65").unwrap_or_default();
        assert!(slots.len() >= 100 && slots.len() < 100 + 8, "whole blocks only: {}", slots.len());
        let sizes: std::collections::BTreeSet<usize> = blocks(&slots).values().map(Vec::len).collect();
        assert_eq!(sizes, [4, 8].into(), "both block sizes are used");
    }

    #[test]
    fn the_same_seed_gives_the_same_list_and_another_seed_another() {
        assert_eq!(generate(&spec(7), "AGE<65"), generate(&spec(7), "AGE<65"));
        assert_ne!(generate(&spec(7), "AGE<65"), generate(&spec(8), "AGE<65"));
    }

    #[test]
    fn strata_have_independent_lists() {
        let young = generate(&spec(7), "AGE<65").unwrap_or_default();
        let old = generate(&spec(7), "AGE>=65").unwrap_or_default();
        assert_ne!(
            young.iter().map(|s| &s.arm).collect::<Vec<_>>(),
            old.iter().map(|s| &s.arm).collect::<Vec<_>>()
        );
        // Each is balanced on its own.
        for list in [&young, &old] {
            let hi = list.iter().filter(|s| s.arm == "XAN_HI").count();
            let blocks_done = blocks(list).values().map(Vec::len).sum::<usize>();
            assert_eq!(hi * 2, blocks_done, "XAN_HI is half of every stratum");
        }
    }

    #[test]
    fn sequences_are_unique_and_dense() {
        let slots = generate(&spec(3), "S").unwrap_or_default();
        let sequences: Vec<u32> = slots.iter().map(|s| s.sequence).collect();
        assert_eq!(sequences, (1..=slots.len() as u32).collect::<Vec<_>>(), "no number twice, none skipped");
    }

    #[test]
    fn bad_configuration_is_refused_with_the_reason() {
        let mut s = spec(1);
        s.arms.truncate(1);
        assert_eq!(generate(&s, "S"), Err(ListError::TooFewArms(1)));
        let mut s = spec(1);
        s.arms[1].ratio = 0;
        assert_eq!(generate(&s, "S"), Err(ListError::ZeroRatio("XAN_LO".into())));
        let mut s = spec(1);
        s.arms[2].code = "PBO".into();
        assert_eq!(generate(&s, "S"), Err(ListError::DuplicateArm("PBO".into())));
        let mut s = spec(1);
        s.block_multiples = vec![0];
        assert_eq!(generate(&s, "S"), Err(ListError::BadBlockMultiples(vec![0])));
        let mut s = spec(1);
        s.slots_per_stratum = 0;
        assert_eq!(generate(&s, "S"), Err(ListError::NoSlots));
    }
}
