//! Order statistics over timing samples.

use std::time::Duration;

/// Summary of one implementation's samples for one row, in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// Summarize `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Self> {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        Some(Self {
            n: ms.len(),
            median: percentile(&ms, 0.5),
            p10: percentile(&ms, 0.1),
            p90: percentile(&ms, 0.9),
            min: ms[0],
            max: ms[ms.len() - 1],
        })
    }
}

/// The `p`-quantile (0..=1) of ascending `sorted`, interpolating linearly between
/// the two nearest ranks (Hyndman & Fan type 7, the default of R and NumPy). For
/// `p = 0.5` that is the middle element, or the mean of the two middle ones.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of no samples");
    assert!((0.0..=1.0).contains(&p), "percentile {p} out of range");
    let rank = p * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_and_even() {
        assert_eq!(percentile(&[1.0, 2.0, 9.0], 0.5), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 4.0, 9.0], 0.5), 3.0);
        assert_eq!(percentile(&[7.0], 0.5), 7.0);
    }

    #[test]
    fn tails_interpolate() {
        let v: Vec<f64> = (1..=11).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.1), 2.0);
        assert_eq!(percentile(&v, 0.9), 10.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 1.0), 11.0);
        assert!((percentile(&[0.0, 10.0], 0.1) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn summary_sorts_its_input() {
        let d = |ms| Duration::from_millis(ms);
        let s = Summary::of(&[d(30), d(10), d(20), d(40)]).unwrap();
        assert_eq!(s.median, 25.0);
        assert_eq!((s.min, s.max, s.n), (10.0, 40.0, 4));
        assert!(Summary::of(&[]).is_none());
    }
}
