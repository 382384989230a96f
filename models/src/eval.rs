//! Full-ranking evaluation: every catalog item is a candidate (no sampled
//! negatives); the items of the user's own history are excluded (the
//! S3-Rec / ICLRec full-sort protocol), except the target itself when the user
//! had it before (so a repeat can still be a hit). HR@k and NDCG@k for k in
//! 5, 10, 20, averaged over users.

use candle_core::Device;

use crate::batch::RankBatch;
use crate::data::RankingCase;
use crate::error::{invalid, Result};
use crate::nn::Dropout;
use crate::scoring::top_n;
use crate::Recommender;

/// The cut-offs reported.
pub const CUTOFFS: [usize; 3] = [5, 10, 20];

/// Hit rate and NDCG at [`CUTOFFS`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    /// HR@5, HR@10, HR@20.
    pub hr: [f64; 3],
    /// NDCG@5, NDCG@10, NDCG@20.
    pub ndcg: [f64; 3],
    /// Number of users averaged over.
    pub users: usize,
}

impl Metrics {
    /// NDCG@10, the early-stopping criterion.
    pub fn ndcg10(&self) -> f64 {
        self.ndcg[1]
    }

    /// HR@10.
    pub fn hr10(&self) -> f64 {
        self.hr[1]
    }

    /// Adds one user whose target sits at `rank` (0 = first) in the ranking, `None` = beyond 20.
    fn add(&mut self, rank: Option<usize>) {
        self.users += 1;
        if let Some(rank) = rank {
            let gain = 1.0 / ((rank + 2) as f64).log2();
            for (i, &k) in CUTOFFS.iter().enumerate() {
                if rank < k {
                    self.hr[i] += 1.0;
                    self.ndcg[i] += gain;
                }
            }
        }
    }

    fn finish(mut self) -> Self {
        let n = self.users.max(1) as f64;
        self.hr.iter_mut().chain(self.ndcg.iter_mut()).for_each(|m| *m /= n);
        self
    }

    /// `"HR@5 .. NDCG@20"` as a JSON object body.
    pub fn to_json(&self) -> String {
        let mut fields = Vec::new();
        for (i, k) in CUTOFFS.iter().enumerate() {
            fields.push(format!("\"hr@{k}\":{:.6}", self.hr[i]));
        }
        for (i, k) in CUTOFFS.iter().enumerate() {
            fields.push(format!("\"ndcg@{k}\":{:.6}", self.ndcg[i]));
        }
        format!("{{{}}}", fields.join(","))
    }
}

/// Ranks the catalog for every case and scores the targets' positions.
pub fn evaluate(
    model: &dyn Recommender,
    cases: &[RankingCase],
    max_len: usize,
    batch_size: usize,
    device: &Device,
) -> Result<Metrics> {
    let depth = CUTOFFS[CUTOFFS.len() - 1];
    let mut metrics = Metrics::default();
    for (ranking, case) in rankings(model, cases, max_len, batch_size, depth, device)?
        .iter()
        .zip(cases)
    {
        metrics.add(ranking.iter().position(|&i| i == case.target));
    }
    Ok(metrics.finish())
}

/// The `depth` best items of every case, best first (ties to the lower id),
/// the case's history excluded except its target.
pub fn rankings(
    model: &dyn Recommender,
    cases: &[RankingCase],
    max_len: usize,
    batch_size: usize,
    depth: usize,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    if batch_size == 0 {
        return Err(invalid("batch_size", "at least 1", 0));
    }
    let mut out = Vec::with_capacity(cases.len());
    for chunk in cases.chunks(batch_size) {
        let batch = RankBatch::new(chunk, max_len, device)?;
        let query = model.query(&batch.batch, &batch.rows, &mut Dropout::off())?;
        let excluded: Vec<Vec<u32>> = chunk
            .iter()
            .map(|c| c.history.iter().copied().filter(|&i| i != c.target).collect())
            .collect();
        out.extend(top_n(&query, &excluded, depth)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_from_ranks() {
        let mut m = Metrics::default();
        m.add(Some(0));
        m.add(Some(7));
        m.add(None);
        m.add(Some(19));
        let m = m.finish();
        assert_eq!(m.hr, [0.25, 0.5, 0.75]);
        let g7 = 1.0 / 9f64.log2();
        let g19 = 1.0 / 21f64.log2();
        assert!((m.ndcg[0] - 0.25).abs() < 1e-12);
        assert!((m.ndcg[1] - (1.0 + g7) / 4.0).abs() < 1e-12);
        assert!((m.ndcg[2] - (1.0 + g7 + g19) / 4.0).abs() < 1e-12);
        assert!(m.to_json().starts_with("{\"hr@5\":0.250000,"));
    }
}
