//! Catalog scoring: the cross-entropy over the whole catalog and the top-n
//! ranking, in DESIGN 4.4's terms (user states `U [R, H, D]`, gate logits
//! `G [R, H]`, item tables `X [H, V+1, D]` or shared `[V+1, D]`, Logits or
//! Probabilities mixing), through moerec's fused candle ops
//! (`moerec::candle::{cross_entropy, topk}`): nothing of size `R x V` is
//! allocated, forward or backward. The padding item 0 is excluded from every
//! softmax and ranking.

use candle_core::{DType, Tensor};
use moerec::candle::{self as fused, ScoringOptions};

use crate::error::{invalid, Result};

pub use moerec::scoring::Mixing;

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
    /// `1 / temperature`, multiplying every head's scores (1 = none).
    pub scale: f32,
}

impl CatalogQuery {
    /// The catalog size V (ids `1..=V`).
    fn catalog(&self) -> Result<usize> {
        Ok(self.items.dim(self.items.rank().saturating_sub(2))? - 1)
    }

    /// The gate logits, zeros `[R, 1]` for one head (softmax of one logit is 1).
    fn gates(&self) -> Result<Tensor> {
        let (rows, heads, _) = self.user.dims3()?;
        match &self.gate_logits {
            Some(g) => Ok(g.clone()),
            None if heads == 1 => Ok(Tensor::zeros((rows, 1), DType::F32, self.user.device())?),
            None => Err(invalid("gate_logits", format!("present for {heads} heads"), "None")),
        }
    }

    fn options(&self) -> Result<ScoringOptions> {
        Ok(ScoringOptions {
            mixing: self.mixing,
            scale: self.scale,
            excluded: Some(Tensor::new(&[0u32], self.user.device())?),
            ..ScoringOptions::default()
        })
    }
}

/// Mean over rows of `-log P[r, targets[r]]` (`targets: [R]` u32 in `1..=V`).
pub fn cross_entropy(query: &CatalogQuery, targets: &Tensor) -> Result<Tensor> {
    let catalog = query.catalog()? as u32;
    if let Some(bad) = targets.to_vec1::<u32>()?.into_iter().find(|&t| t == 0 || t > catalog) {
        return Err(invalid("target", format!("an item id in 1..={catalog}"), bad));
    }
    let loss = fused::cross_entropy(
        &query.user,
        &query.gates()?,
        &query.items,
        targets,
        None,
        &query.options()?,
    )?;
    Ok(loss.mean_all()?)
}

/// The `n` best items of each row, best first (ties to the lower id), skipping
/// the items in `excluded[r]` (the user's own history) and the padding item.
pub fn top_n(query: &CatalogQuery, excluded: &[Vec<u32>], n: usize) -> Result<Vec<Vec<u32>>> {
    let rows = query.user.dim(0)?;
    if excluded.len() != rows {
        return Err(invalid("excluded", format!("{rows} lists"), excluded.len()));
    }
    let catalog = query.catalog()? as u32;
    let mut offsets = Vec::with_capacity(rows + 1);
    offsets.push(0u32);
    let mut ids = Vec::new();
    for list in excluded {
        if let Some(&bad) = list.iter().find(|&&i| i == 0 || i > catalog) {
            return Err(invalid("excluded item", format!("an id in 1..={catalog}"), bad));
        }
        ids.extend_from_slice(list);
        offsets.push(ids.len() as u32);
    }
    let device = query.user.device();
    let offsets = Tensor::new(offsets.as_slice(), device)?;
    let count = ids.len();
    let ids = Tensor::from_vec(ids, count, device)?;
    let (best, _) = fused::topk(
        &query.user,
        &query.gates()?,
        &query.items,
        n,
        Some((&offsets, &ids)),
        &query.options()?,
    )?;
    Ok(best.to_vec2::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
            scale: 1.0,
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
            scale: 1.0,
        };
        let (s1, s2) = (g[0] * 1.0, g[1] * 3.0);
        let want = -(s1 - (s1.exp() + s2.exp()).ln());
        assert!((cross_entropy(&logits, &target).unwrap().to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
        let probs = CatalogQuery {
            user,
            gate_logits: Some(gate),
            items,
            mixing: Mixing::Probabilities,
            scale: 1.0,
        };
        let p = g[0] * (1.0f32.exp() / (1.0f32.exp() + 1.0)) + g[1] * (1.0 / (1.0 + 3.0f32.exp()));
        assert!((cross_entropy(&probs, &target).unwrap().to_scalar::<f32>().unwrap() + p.ln()).abs() < 1e-5);
    }
}
