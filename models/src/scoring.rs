//! Catalog scoring: the cross-entropy over the whole catalog and the top-n
//! ranking, in DESIGN 4.4's terms (user states `U [R, H, D]`, gate logits
//! `G [R, H]`, item tables `X [H, V, D]` or shared `[V, D]`, Logits or
//! Probabilities mixing, the padding item 0 excluded from every softmax).
//!
//! Written in plain candle ops for now: moerec's fused `moerec::candle`
//! scoring ops replace the bodies of [`cross_entropy`] and [`top_n`] when
//! they land; callers do not change.

use candle_core::{Tensor, D};

use crate::error::{invalid, Result};
use crate::nn::{log_softmax_last_dim, softmax_last_dim};

/// How per-head scores are mixed by the gate (DESIGN 4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mixing {
    /// `S = Σ_h g_h s_h`, `P = softmax(S)`.
    Logits,
    /// `P = Σ_h g_h softmax(s_h)`.
    Probabilities,
}

/// What a model hands to the catalog scorer for R rows.
pub struct CatalogQuery {
    /// `[R, H, D]` user states.
    pub user: Tensor,
    /// `[R, H]` gate logits (`g = softmax_h`); `None` means H = 1.
    pub gate_logits: Option<Tensor>,
    /// `[H, V+1, D]` per-head tables or `[V+1, D]` shared; row 0 is padding.
    pub items: Tensor,
    /// The mixing of the heads.
    pub mixing: Mixing,
}

impl CatalogQuery {
    /// `[R, H, V]` per-head scores over items `1..=V`.
    fn head_scores(&self) -> Result<Tensor> {
        let (rows, heads, dim) = self.user.dims3()?;
        if self.gate_logits.is_none() && heads != 1 {
            return Err(invalid("gate_logits", format!("present for {heads} heads"), "None"));
        }
        match self.items.rank() {
            2 => {
                let catalog = self.items.dim(0)? - 1;
                let items = self.items.narrow(0, 1, catalog)?;
                let s = self.user.reshape((rows * heads, dim))?.matmul(&items.t()?)?;
                Ok(s.reshape((rows, heads, catalog))?)
            }
            3 => {
                let catalog = self.items.dim(1)? - 1;
                let items = self.items.narrow(1, 1, catalog)?.transpose(1, 2)?;
                let s = self.user.transpose(0, 1)?.contiguous()?.matmul(&items)?;
                Ok(s.transpose(0, 1)?.contiguous()?)
            }
            r => Err(invalid("items", "[V+1, D] or [H, V+1, D]", format!("rank {r}"))),
        }
    }

    /// `[R, V]`: mixed logits (Logits) or log-probabilities (Probabilities)
    /// over items `1..=V`; either ranks items the same way as P.
    fn mixed_log_scores(&self) -> Result<Tensor> {
        let s = self.head_scores()?;
        let Some(g) = &self.gate_logits else {
            return Ok(s.squeeze(1)?);
        };
        match self.mixing {
            Mixing::Logits => Ok(s.broadcast_mul(&softmax_last_dim(g)?.unsqueeze(2)?)?.sum(1)?),
            Mixing::Probabilities => {
                // log P = logsumexp_h(log g_h + log softmax(s_h)).
                let terms = log_softmax_last_dim(&s)?.broadcast_add(&log_softmax_last_dim(g)?.unsqueeze(2)?)?;
                let top = terms.max_keepdim(1)?.detach();
                Ok(terms
                    .broadcast_sub(&top)?
                    .exp()?
                    .sum_keepdim(1)?
                    .log()?
                    .broadcast_add(&top)?
                    .squeeze(1)?)
            }
        }
    }
}

/// Mean over rows of `-log P[r, targets[r]]` (`targets: [R]` u32 in `1..=V`).
pub fn cross_entropy(query: &CatalogQuery, targets: &Tensor) -> Result<Tensor> {
    let log_scores = query.mixed_log_scores()?;
    let catalog = log_scores.dim(1)? as u32;
    let ids = targets.to_vec1::<u32>()?;
    if let Some(bad) = ids.iter().find(|&&t| t == 0 || t > catalog) {
        return Err(invalid("target", format!("an item id in 1..={catalog}"), bad));
    }
    let log_p = match (query.gate_logits.is_some(), query.mixing) {
        (true, Mixing::Probabilities) => log_scores,
        _ => log_softmax_last_dim(&log_scores)?,
    };
    let rows = ids.len();
    let column = Tensor::from_vec(
        ids.into_iter().map(|t| t - 1).collect::<Vec<u32>>(),
        (rows, 1),
        targets.device(),
    )?;
    Ok(log_p.gather(&column, D::Minus1)?.neg()?.mean_all()?)
}

/// The `n` best items of each row, best first (ties to the lower id), skipping
/// the items in `excluded[r]` (the user's own history) and the padding item.
pub fn top_n(query: &CatalogQuery, excluded: &[Vec<u32>], n: usize) -> Result<Vec<Vec<u32>>> {
    let scores = query.mixed_log_scores()?.detach().to_vec2::<f32>()?;
    if scores.len() != excluded.len() {
        return Err(invalid("excluded", format!("{} lists", scores.len()), excluded.len()));
    }
    scores
        .into_iter()
        .zip(excluded)
        .map(|(mut row, skip)| {
            for &item in skip {
                if item == 0 || item as usize > row.len() {
                    return Err(invalid("excluded item", format!("an id in 1..={}", row.len()), item));
                }
                row[item as usize - 1] = f32::NEG_INFINITY;
            }
            best_n(&row, skip.len(), n)
        })
        .collect()
}

/// Ids (1-based) of the `n` largest finite-or-not entries of `row`, best first,
/// ties to the lower id, NaN below every number; `excluded` items hold -inf
/// and are never returned.
fn best_n(row: &[f32], excluded: usize, n: usize) -> Result<Vec<u32>> {
    let mut eligible: Vec<u32> = (0..row.len() as u32)
        .filter(|&i| row[i as usize] != f32::NEG_INFINITY)
        .collect();
    if eligible.len() < n {
        return Err(invalid(
            "n",
            format!(
                "at most the {} items not excluded ({excluded} excluded)",
                eligible.len()
            ),
            n,
        ));
    }
    let key = |i: &u32| {
        let s = row[*i as usize];
        (if s.is_nan() { f32::NEG_INFINITY } else { s }, *i)
    };
    let better = |a: &u32, b: &u32| {
        let (sa, ia) = key(a);
        let (sb, ib) = key(b);
        sb.total_cmp(&sa).then(ia.cmp(&ib))
    };
    if n < eligible.len() && n > 0 {
        eligible.select_nth_unstable_by(n - 1, better);
    }
    eligible.truncate(n);
    eligible.sort_unstable_by(better);
    Ok(eligible.into_iter().map(|i| i + 1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn best_n_orders_by_score_then_id_and_skips_excluded() {
        let inf = f32::NEG_INFINITY;
        let row = [0.5, 2.0, f32::NAN, 2.0, inf, 1.0];
        assert_eq!(best_n(&row, 1, 4).unwrap(), vec![2, 4, 6, 1]);
        assert_eq!(best_n(&row, 1, 5).unwrap(), vec![2, 4, 6, 1, 3]);
        assert!(best_n(&row, 1, 6)
            .unwrap_err()
            .to_string()
            .contains("at most the 5 items"));
    }

    #[test]
    fn one_head_cross_entropy_matches_a_hand_computed_value() {
        let dev = Device::Cpu;
        // Items 1, 2 score 1 and 2 for the one user; row 0 (padding) is never a candidate.
        let items = Tensor::new(&[[9.0f32], [1.0], [2.0]], &dev).unwrap();
        let user = Tensor::new(&[[[1.0f32]]], &dev).unwrap();
        let q = CatalogQuery {
            user,
            gate_logits: None,
            items,
            mixing: Mixing::Logits,
        };
        let loss = cross_entropy(&q, &Tensor::new(&[1u32], &dev).unwrap()).unwrap();
        let want = -(1.0f32.exp() / (1.0f32.exp() + 2.0f32.exp())).ln();
        assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
        assert_eq!(top_n(&q, &[vec![]], 2).unwrap(), vec![vec![2, 1]]);
        assert_eq!(top_n(&q, &[vec![2]], 1).unwrap(), vec![vec![1]]);
        assert!(cross_entropy(&q, &Tensor::new(&[3u32], &dev).unwrap()).is_err());
    }

    #[test]
    fn gated_mixings_match_their_definitions() {
        let dev = Device::Cpu;
        // Two heads, per-head tables over 2 items.
        let items = Tensor::new(&[[[0.0f32], [1.0], [0.0]], [[0.0], [0.0], [3.0]]], &dev).unwrap();
        let user = Tensor::new(&[[[1.0f32], [1.0]]], &dev).unwrap();
        let gate = Tensor::new(&[[0.0f32, 1.0]], &dev).unwrap();
        let g1 = 1.0 / (1.0 + 1.0f32.exp());
        let g = [g1, 1.0 - g1];
        let target = Tensor::new(&[1u32], &dev).unwrap();
        let logits = CatalogQuery {
            user: user.clone(),
            gate_logits: Some(gate.clone()),
            items: items.clone(),
            mixing: Mixing::Logits,
        };
        let (s1, s2) = (g[0] * 1.0, g[1] * 3.0);
        let want = -(s1 - (s1.exp() + s2.exp()).ln());
        assert!((cross_entropy(&logits, &target).unwrap().to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
        let probs = CatalogQuery {
            user,
            gate_logits: Some(gate),
            items,
            mixing: Mixing::Probabilities,
        };
        let p = g[0] * (1.0f32.exp() / (1.0f32.exp() + 1.0)) + g[1] * (1.0 / (1.0 + 3.0f32.exp()));
        assert!((cross_entropy(&probs, &target).unwrap().to_scalar::<f32>().unwrap() + p.ln()).abs() < 1e-5);
    }
}
