//! Quantiles of latency samples, as every report and benchmark here gives them.

/// The `q` quantile (0 < q ≤ 1) of `sorted` (ascending) by nearest rank: the smallest sample with
/// at least `q` of the samples at or below it. `None` for no samples.
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

/// `samples` sorted ascending (floats by their total order).
pub fn sorted_f64(mut samples: Vec<f64>) -> Vec<f64> {
    samples.sort_by(f64::total_cmp);
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let hundred: Vec<u32> = (1..=100).collect();
        let at = |q| nearest_rank(&hundred, q);
        assert_eq!((at(0.5), at(0.95), at(0.99), at(1.0)), (Some(50), Some(95), Some(99), Some(100)));
        assert_eq!(nearest_rank(&[7], 0.99), Some(7));
        assert_eq!(nearest_rank(&[7, 9], 0.5), Some(7));
        assert_eq!(nearest_rank::<u32>(&[], 0.5), None);
        assert_eq!(sorted_f64(vec![3.0, -1.0, 2.0]), [-1.0, 2.0, 3.0]);
    }
}
