//! Summaries of repeated measurements: median, min and max.

/// Median, min and max of a set of figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// None for an empty set. The median of an even count is the mean of the middle two.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// Milliseconds: "850 ms", "12.3 s" from 10 s on.
pub fn ms(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} s", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

/// Milliseconds without a unit (inside ranges): "850", "12.3".
pub fn ms_bare(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Bytes in binary-free decimal units: "401.2 MB", "17.9 kB".
pub fn bytes(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.2} GB", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.1} MB", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} kB", v / 1e3)
    } else {
        format!("{v:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        assert_eq!(Summary::of(&[]), None);
        let s = Summary::of(&[3.0, 1.0, 2.0]).expect("some");
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Summary::of(&[4.0, 1.0, 2.0, 3.0]).expect("some");
        assert_eq!(s.median, 2.5);
        let s = Summary::of(&[5.0, f64::NAN]).expect("some");
        assert_eq!(s.n, 1);
    }

    #[test]
    fn units() {
        assert_eq!(ms(12_345.0), "12.3 s");
        assert_eq!(ms(850.4), "850 ms");
        assert_eq!(ms(3.21), "3.2 ms");
        assert_eq!(bytes(401_196_912.0), "401.2 MB");
        assert_eq!(bytes(17_894.0), "17.9 kB");
        assert_eq!(bytes(12.0), "12 B");
    }
}
