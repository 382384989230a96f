//! Batches: sequences left-padded with 0 to the batch's longest input.
//!
//! Positions count back from the newest item (`max_len - width + t`), so a
//! batch cut to its longest sequence gives the same result as one padded to
//! `max_len`: padded keys are masked out of attention (see [`Batch::attention_bias`]).

use candle_core::{Device, Tensor};

use crate::data::{RankingCase, TrainSequence};
use crate::error::{invalid, Result};

/// Inputs shared by training and ranking batches.
#[derive(Debug)]
pub struct Batch {
    /// `[B, T]` u32 item ids, left-padded with 0.
    pub inputs: Tensor,
    /// `[T]` u32 positional-embedding rows.
    pub positions: Tensor,
    /// `[B, 1, T, T]` f32 additive attention bias: 0 where query t may see key s
    /// (s <= t and s is an item, or s == t), -inf elsewhere. Letting a padding
    /// query see itself keeps every softmax row finite; padding rows feed no loss.
    pub attention_bias: Tensor,
    /// B.
    pub size: usize,
    /// T.
    pub width: usize,
}

impl Batch {
    /// Pads `sequences` (each 1..=max_len items) on the left.
    pub fn new(sequences: &[&[u32]], max_len: usize, device: &Device) -> Result<Self> {
        let size = sequences.len();
        if size == 0 {
            return Err(invalid("sequences", "at least one", 0));
        }
        let width = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        if width == 0 || width > max_len {
            return Err(invalid("longest sequence", format!("1..={max_len} items"), width));
        }
        let mut ids = vec![0u32; size * width];
        for (b, seq) in sequences.iter().enumerate() {
            ids[b * width + width - seq.len()..(b + 1) * width].copy_from_slice(seq);
        }
        let mut bias = vec![f32::NEG_INFINITY; size * width * width];
        for b in 0..size {
            let row = &ids[b * width..(b + 1) * width];
            for t in 0..width {
                let out = &mut bias[(b * width + t) * width..(b * width + t + 1) * width];
                for s in 0..=t {
                    if row[s] != 0 || s == t {
                        out[s] = 0.0;
                    }
                }
            }
        }
        let positions: Vec<u32> = (0..width).map(|t| (max_len - width + t) as u32).collect();
        Ok(Self {
            inputs: Tensor::from_vec(ids, (size, width), device)?,
            positions: Tensor::from_vec(positions, width, device)?,
            attention_bias: Tensor::from_vec(bias, (size, 1, width, width), device)?,
            size,
            width,
        })
    }
}

/// A training batch: a loss term at every non-padding position.
#[derive(Debug)]
pub struct TrainBatch {
    /// The padded inputs.
    pub batch: Batch,
    /// `[R]` u32 flat indices `b * T + t` of the positions with a target.
    pub rows: Tensor,
    /// `[R]` u32 the target item of each such position.
    pub targets: Tensor,
}

impl TrainBatch {
    /// Builds a batch from training sequences.
    pub fn new(sequences: &[&TrainSequence], max_len: usize, device: &Device) -> Result<Self> {
        let inputs: Vec<&[u32]> = sequences.iter().map(|s| s.inputs.as_slice()).collect();
        let batch = Batch::new(&inputs, max_len, device)?;
        let width = batch.width;
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (b, seq) in sequences.iter().enumerate() {
            let first = b * width + width - seq.targets.len();
            rows.extend((first..first + seq.targets.len()).map(|r| r as u32));
            targets.extend_from_slice(&seq.targets);
        }
        let n = rows.len();
        Ok(Self {
            batch,
            rows: Tensor::from_vec(rows, n, device)?,
            targets: Tensor::from_vec(targets, n, device)?,
        })
    }
}

/// A ranking batch: one user state per sequence, at its newest item.
#[derive(Debug)]
pub struct RankBatch<'a> {
    /// The padded inputs.
    pub batch: Batch,
    /// `[B]` u32 flat indices `b * T + T - 1`.
    pub rows: Tensor,
    /// The cases, for their targets and the histories excluded from the ranking.
    pub cases: &'a [RankingCase],
}

impl<'a> RankBatch<'a> {
    /// Builds a batch from ranking cases.
    pub fn new(cases: &'a [RankingCase], max_len: usize, device: &Device) -> Result<Self> {
        let inputs: Vec<&[u32]> = cases.iter().map(|c| c.input(max_len)).collect();
        let batch = Batch::new(&inputs, max_len, device)?;
        let rows: Vec<u32> = (0..batch.size)
            .map(|b| (b * batch.width + batch.width - 1) as u32)
            .collect();
        let n = rows.len();
        Ok(Self {
            batch,
            rows: Tensor::from_vec(rows, n, device)?,
            cases,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_left_and_masks_padding_keys() {
        let b = Batch::new(&[&[4, 5], &[7, 8, 9]], 50, &Device::Cpu).unwrap();
        assert_eq!(b.inputs.to_vec2::<u32>().unwrap(), vec![vec![0, 4, 5], vec![7, 8, 9]]);
        assert_eq!(b.positions.to_vec1::<u32>().unwrap(), vec![47, 48, 49]);
        let bias = b.attention_bias.squeeze(1).unwrap().to_vec3::<f32>().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            bias[0],
            vec![vec![0.0, inf, inf], vec![inf, 0.0, inf], vec![inf, 0.0, 0.0]]
        );
        assert_eq!(
            bias[1],
            vec![vec![0.0, inf, inf], vec![0.0, 0.0, inf], vec![0.0, 0.0, 0.0]]
        );
    }

    #[test]
    fn train_rows_point_at_targets() {
        let a = TrainSequence {
            inputs: vec![1],
            targets: vec![2],
        };
        let c = TrainSequence {
            inputs: vec![3, 4],
            targets: vec![4, 5],
        };
        let t = TrainBatch::new(&[&a, &c], 50, &Device::Cpu).unwrap();
        assert_eq!(t.rows.to_vec1::<u32>().unwrap(), vec![1, 2, 3]);
        assert_eq!(t.targets.to_vec1::<u32>().unwrap(), vec![2, 4, 5]);
    }

    #[test]
    fn rejects_empty_and_overlong() {
        assert!(Batch::new(&[], 50, &Device::Cpu).is_err());
        let e = Batch::new(&[&[1, 2, 3]], 2, &Device::Cpu).unwrap_err().to_string();
        assert_eq!(e, "longest sequence: expected 1..=2 items, got 3");
    }
}
