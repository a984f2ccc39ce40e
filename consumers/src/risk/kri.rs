//! Key risk indicators and how a site's value is scored against the study's, as the {gsm}
//! packages (Gilead's Good Statistical Monitoring) do it: a funnel plot with the normal
//! approximation and a multiplicative over-dispersion factor.
//!
//! For the sites `i` of one study, with numerator `xᵢ` and denominator `nᵢ` (subjects for a
//! proportion, exposure days for a rate) and metric `mᵢ = xᵢ / nᵢ`:
//!
//! * the study's metric `μ = Σxᵢ / Σnᵢ`;
//! * unadjusted scores: binary `z₀ᵢ = (mᵢ − μ) / √(μ(1 − μ) / nᵢ)`, rate
//!   `z₀ᵢ = (mᵢ − μ) / √(μ / nᵢ)`;
//! * over-dispersion `φ = mean of z₀ᵢ²` over the sites;
//! * score `zᵢ = z₀ᵢ / √φ`;
//! * flag by the thresholds (defaults ±2 amber, ±3 red, strict comparisons as in
//!   `gsm::Flag_NormalApprox`): `z < −3` → −2, `z < −2` → −1, `z < 2` → 0, `z < 3` → 1, else 2;
//! * a site whose denominator is below the KRI's minimum counts in `μ` and `φ` but gets no score
//!   and no flag (`gsm::Summarize` with `nMinDenominator`).
//!
//! Where {gsm} would compute NaN — a study metric of 0 (or 1 for a proportion), `φ = 0`, a single
//! site with a denominator — no site gets a score: nothing distinguishes a site then. Sites
//! without any denominator yet (no subject screened, no exposure) are left out, as {gsm}'s input
//! has no row for them.
//!
//! References: Zink RC et al. (2018), *Sources of Variation in Central Statistical Monitoring*;
//! Spiegelhalter DJ (2005), *Funnel plots for comparing institutional performance*, Statistics in
//! Medicine 24:1185–1202; the gsm.core "KRI Method" vignette (`Analyze_NormalApprox`,
//! `Flag_NormalApprox`, `Summarize`).

use serde::{Deserialize, Serialize};

/// How a KRI's metric is distributed under "every site is like the study".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// A proportion of subjects (binomial).
    Binary,
    /// Events per exposure day (Poisson).
    Rate,
}

/// One KRI of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kri {
    /// Stable id (event payloads, configuration, API).
    pub id: &'static str,
    /// Its name for people.
    pub name: &'static str,
    pub method: Method,
    /// What the numerator counts.
    pub numerator: &'static str,
    /// What the denominator counts.
    pub denominator: &'static str,
    /// The denominator a site needs before it is scored (default of [`Thresholds`]).
    pub min_denominator: f64,
    /// The {gsm} KRI it corresponds to.
    pub gsm: &'static str,
}

/// Adverse events per exposure day.
pub const AE_RATE: Kri = Kri {
    id: "AE_RATE",
    name: "Adverse-event rate",
    method: Method::Rate,
    numerator: "adverse events (distinct `ae_id`) of enrolled subjects",
    denominator: "exposure days of enrolled subjects",
    min_denominator: 30.0,
    gsm: "kri0001",
};

/// Serious adverse events per exposure day.
pub const SAE_RATE: Kri = Kri {
    id: "SAE_RATE",
    name: "Serious adverse-event rate",
    method: Method::Rate,
    numerator: "serious adverse events (distinct `ae_id` ever reported serious) of enrolled subjects",
    denominator: "exposure days of enrolled subjects",
    min_denominator: 30.0,
    gsm: "kri0002",
};

/// Subjects withdrawn among those enrolled.
pub const DISCONTINUATION: Kri = Kri {
    id: "DISCONTINUATION",
    name: "Study discontinuation",
    method: Method::Binary,
    numerator: "enrolled subjects withdrawn",
    denominator: "subjects enrolled",
    min_denominator: 3.0,
    gsm: "kri0006",
};

/// Screen failures among the subjects screened.
pub const SCREEN_FAILURE: Kri = Kri {
    id: "SCREEN_FAILURE",
    name: "Screen failure",
    method: Method::Binary,
    numerator: "subjects assessed not eligible",
    denominator: "subjects whose eligibility was assessed",
    min_denominator: 3.0,
    gsm: "kri0012",
};

/// Inputs recorded late after their clinical date.
pub const DATA_ENTRY_LAG: Kri = Kri {
    id: "DATA_ENTRY_LAG",
    name: "Data-entry lag",
    method: Method::Binary,
    numerator: "inputs recorded more than `data_entry_lag_days` (default 10) days after their clinical date",
    denominator: "inputs (vital-sign readings by effective date, adverse-event reports by onset date) dated to the day",
    min_denominator: 30.0,
    gsm: "kri0010",
};

/// Queries opened per data point.
pub const QUERY_RATE: Kri = Kri {
    id: "QUERY_RATE",
    name: "Query rate",
    method: Method::Rate,
    numerator: "queries opened by edit checks",
    denominator: "data points (vital-sign readings and adverse-event reports)",
    min_denominator: 30.0,
    gsm: "kri0008",
};

/// Queries left open more than 30 days.
pub const QUERY_AGE: Kri = Kri {
    id: "QUERY_AGE",
    name: "Outstanding queries",
    method: Method::Binary,
    numerator: "queries not closed more than 30 days after they were opened (server clock)",
    denominator: "queries opened",
    min_denominator: 3.0,
    gsm: "kri0009",
};

/// Scheduled ePRO occurrences missed.
pub const EPRO_COMPLIANCE: Kri = Kri {
    id: "EPRO_COMPLIANCE",
    name: "ePRO occurrences missed",
    method: Method::Binary,
    numerator: "scheduled questionnaire occurrences due without an accepted response",
    denominator: "scheduled questionnaire occurrences of enrolled subjects due by the study's clock, before their withdrawal",
    min_denominator: 10.0,
    gsm: "–",
};

/// Every KRI the risk service keeps.
pub const CATALOGUE: &[Kri] = &[
    AE_RATE,
    SAE_RATE,
    DISCONTINUATION,
    SCREEN_FAILURE,
    DATA_ENTRY_LAG,
    QUERY_RATE,
    QUERY_AGE,
    EPRO_COMPLIANCE,
];

/// How long a query may stay open before it counts as outstanding ([`QUERY_AGE`]).
pub const QUERY_AGE_DAYS: i32 = 30;

/// The KRI called `id`.
pub fn kri(id: &str) -> Option<&'static Kri> {
    CATALOGUE.iter().find(|k| k.id == id)
}

/// Where a score turns amber and red (both sides), and the minimum denominator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    pub amber: f64,
    pub red: f64,
    pub min_denominator: f64,
}

impl Thresholds {
    /// ±2 amber, ±3 red, and the KRI's minimum denominator.
    pub fn default_for(kri: &Kri) -> Self {
        Self { amber: 2.0, red: 3.0, min_denominator: kri.min_denominator }
    }

    /// Whether the limits can flag anything: finite, `0 < amber < red`, a minimum ≥ 0.
    pub fn check(&self) -> Result<(), String> {
        let finite = self.amber.is_finite() && self.red.is_finite() && self.min_denominator.is_finite();
        if !finite || self.amber <= 0.0 || self.red <= self.amber || self.min_denominator < 0.0 {
            return Err(format!(
                "thresholds need 0 < amber < red and a minimum denominator ≥ 0 (got amber {}, red {}, minimum {})",
                self.amber, self.red, self.min_denominator
            ));
        }
        Ok(())
    }

    /// The flag of score `z`: −2, −1, 0, 1 or 2.
    pub fn flag(&self, z: f64) -> i8 {
        if z < -self.red {
            -2
        } else if z < -self.amber {
            -1
        } else if z < self.amber {
            0
        } else if z < self.red {
            1
        } else {
            2
        }
    }
}

/// A site's counts for one KRI.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteCounts {
    pub site: String,
    pub numerator: f64,
    pub denominator: f64,
}

/// A site's result for one KRI.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteScore {
    pub site: String,
    pub numerator: f64,
    pub denominator: f64,
    /// numerator / denominator.
    pub metric: f64,
    /// The over-dispersion-adjusted z-score; `None` below the minimum denominator or when the
    /// study gives nothing to compare with.
    pub score: Option<f64>,
    /// −2 … 2 from the score; `None` without a score.
    pub flag: Option<i8>,
}

/// One KRI of one study, every site scored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Analysis {
    /// The study's metric `μ`.
    pub overall: f64,
    /// The over-dispersion factor `φ` (`None` when it cannot be computed).
    pub factor: Option<f64>,
    /// The sites with a denominator, in the order given.
    pub sites: Vec<SiteScore>,
}

/// Scores every site of one study for a KRI of method `method`.
pub fn analyze(method: Method, sites: &[SiteCounts], thresholds: &Thresholds) -> Analysis {
    let sites: Vec<&SiteCounts> = sites.iter().filter(|s| s.denominator > 0.0).collect();
    let total_x: f64 = sites.iter().map(|s| s.numerator).sum();
    let total_n: f64 = sites.iter().map(|s| s.denominator).sum();
    let overall = if total_n > 0.0 { total_x / total_n } else { 0.0 };
    let variance = |n: f64| match method {
        Method::Binary => overall * (1.0 - overall) / n,
        Method::Rate => overall / n,
    };
    let degenerate = match method {
        Method::Binary => overall <= 0.0 || overall >= 1.0,
        Method::Rate => overall <= 0.0,
    };
    let z0: Vec<f64> = sites
        .iter()
        .map(|s| {
            if degenerate {
                0.0
            } else {
                (s.numerator / s.denominator - overall) / variance(s.denominator).sqrt()
            }
        })
        .collect();
    let factor =
        (!degenerate && !z0.is_empty()).then(|| z0.iter().map(|z| z * z).sum::<f64>() / z0.len() as f64);
    let scorable = factor.filter(|phi| *phi > 0.0 && phi.is_finite());
    let scored = sites
        .iter()
        .zip(&z0)
        .map(|(s, z0)| {
            let score =
                scorable.filter(|_| s.denominator >= thresholds.min_denominator).map(|phi| z0 / phi.sqrt());
            SiteScore {
                site: s.site.clone(),
                numerator: s.numerator,
                denominator: s.denominator,
                metric: s.numerator / s.denominator,
                score,
                flag: score.map(|z| thresholds.flag(z)),
            }
        })
        .collect();
    Analysis { overall, factor, sites: scored }
}

/// A site's risk score over its KRIs: the sum of `|flag|` (amber 1, red 2) over the KRIs that
/// scored it; 0 when nothing is flagged, at most 2 × the number of KRIs.
pub fn site_risk_score<'a>(flags: impl IntoIterator<Item = Option<i8>> + 'a) -> u32 {
    flags.into_iter().flatten().map(|f| u32::from(f.unsigned_abs())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(rows: &[(&str, f64, f64)]) -> Vec<SiteCounts> {
        rows.iter()
            .map(|(site, x, n)| SiteCounts { site: site.to_string(), numerator: *x, denominator: *n })
            .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// A binary KRI worked by hand: μ = 20/100 = 0.2; z₀ = (mᵢ − 0.2)/√(0.16/nᵢ).
    #[test]
    fn a_proportion_is_scored_with_the_over_dispersion_factor() {
        let sites = counts(&[("A", 2.0, 40.0), ("B", 10.0, 40.0), ("C", 8.0, 20.0)]);
        let a = analyze(Method::Binary, &sites, &Thresholds::default_for(&DISCONTINUATION));
        assert!(close(a.overall, 0.2));
        let z0 = [
            (0.05 - 0.2) / (0.16f64 / 40.0).sqrt(),
            (0.25 - 0.2) / (0.16f64 / 40.0).sqrt(),
            (0.40 - 0.2) / (0.16f64 / 20.0).sqrt(),
        ];
        let phi = z0.iter().map(|z| z * z).sum::<f64>() / 3.0;
        assert!(close(a.factor.unwrap_or_default(), phi), "{a:?}");
        for (site, z0) in a.sites.iter().zip(z0) {
            assert!(close(site.score.unwrap_or(f64::NAN), z0 / phi.sqrt()), "{site:?}");
        }
        // φ = 3.75: the scores shrink by √φ (A: z₀ −2.37 → −1.22), none reaches ±2.
        assert!(close(phi, 3.75));
        assert_eq!(a.sites.iter().map(|s| s.flag).collect::<Vec<_>>(), vec![Some(0); 3]);
    }

    /// Nineteen sites at 10 %, one at 50 %: μ = 0.12, φ ≈ 3.598, the outlier's z ≈ 8.27 / 1.897
    /// ≈ 4.36 (red), the others ≈ −0.23.
    #[test]
    fn an_outlier_among_many_sites_is_red() {
        let mut rows = vec![("OUT", 25.0, 50.0)];
        rows.extend(std::iter::repeat_n(("S", 5.0, 50.0), 19));
        let a = analyze(Method::Binary, &counts(&rows), &Thresholds::default_for(&DISCONTINUATION));
        assert!(close(a.overall, 0.12));
        let z = a.sites[0].score.unwrap_or(f64::NAN);
        assert!((z - 4.3589).abs() < 1e-3, "{z}");
        assert_eq!(a.sites[0].flag, Some(2));
        assert!(a.sites[1..].iter().all(|s| s.flag == Some(0)));
    }

    #[test]
    fn a_rate_is_scored_against_the_study_rate() {
        let sites = counts(&[("A", 1.0, 400.0), ("B", 12.0, 300.0), ("C", 7.0, 300.0), ("D", 0.0, 20.0)]);
        let a = analyze(Method::Rate, &sites, &Thresholds::default_for(&AE_RATE));
        assert!(close(a.overall, 20.0 / 1020.0));
        let mu = 20.0 / 1020.0;
        let z0: Vec<f64> =
            sites.iter().map(|s| (s.numerator / s.denominator - mu) / (mu / s.denominator).sqrt()).collect();
        let phi = z0.iter().map(|z| z * z).sum::<f64>() / 4.0;
        assert!(close(a.factor.unwrap_or_default(), phi));
        assert!(close(a.sites[1].score.unwrap_or(f64::NAN), z0[1] / phi.sqrt()));
        // D counts in μ and φ but has 20 < 30 exposure days: no score, no flag.
        assert_eq!((a.sites[3].score, a.sites[3].flag), (None, None));
    }

    #[test]
    fn flags_use_strict_comparisons_like_gsm() {
        let t = Thresholds { amber: 2.0, red: 3.0, min_denominator: 0.0 };
        let flags: Vec<i8> =
            [-3.5, -3.0, -2.5, -2.0, 0.0, 1.999, 2.0, 2.999, 3.0, 9.0].iter().map(|z| t.flag(*z)).collect();
        assert_eq!(flags, vec![-2, -1, -1, 0, 0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn nothing_is_scored_when_the_study_gives_nothing_to_compare_with() {
        let t = Thresholds::default_for(&DISCONTINUATION);
        for rows in [
            vec![("A", 0.0, 10.0), ("B", 0.0, 12.0)],   // μ = 0
            vec![("A", 10.0, 10.0), ("B", 12.0, 12.0)], // μ = 1
            vec![("A", 1.0, 10.0), ("B", 2.0, 20.0)],   // every site at μ: φ = 0
        ] {
            let a = analyze(Method::Binary, &counts(&rows), &t);
            assert!(a.sites.iter().all(|s| s.score.is_none() && s.flag.is_none()), "{a:?}");
        }
        let a = analyze(Method::Rate, &counts(&[("A", 0.0, 0.0)]), &Thresholds::default_for(&AE_RATE));
        assert!(a.sites.is_empty(), "a site without exposure has no row");
    }

    #[test]
    fn thresholds_that_cannot_flag_are_refused() {
        for t in [
            (2.0, 2.0, 3.0),
            (-1.0, 3.0, 3.0),
            (2.0, f64::NAN, 3.0),
            (2.0, 3.0, -1.0),
            (2.0, f64::INFINITY, 1.0),
        ] {
            let t = Thresholds { amber: t.0, red: t.1, min_denominator: t.2 };
            assert!(t.check().is_err(), "{t:?}");
        }
        assert!(Thresholds::default_for(&AE_RATE).check().is_ok());
    }

    #[test]
    fn the_site_risk_score_adds_up_the_flags() {
        assert_eq!(site_risk_score([Some(-2), Some(1), None, Some(0)]), 3);
        assert_eq!(site_risk_score([None, None]), 0);
    }
}
