//! XSMoE (arXiv 2508.05993, "Efficient Multimodal Streaming Recommendation
//! via Expandable Side Mixture-of-Experts"): a frozen item encoder, a side
//! network of bottleneck experts beside it that grows by one expert per time
//! window, and a SASRec-style user encoder over the resulting item vectors.
//!
//! The model, following the paper and its public reference implementation
//! (qykcq/Efficient-Multimodal-Streaming-Recommendation-via-Expandable-Side-Mixture-of-Experts):
//! - Frozen backbone: states `h_0 .. h_L` of every item. The side network's
//!   input is `x_0 = h_0`; side layer l mixes the candidates `h_{l+1}` (the
//!   backbone's feature) and expert `e`'s `x_l + W_up^e GELU(W_down^e x_l)`
//!   (bottleneck 64, no bias, both matrices N(0, 0.01²)) with a dense softmax
//!   router over `x_l` (`x_l R_l`, no bias, column 0 the backbone):
//!   `x_{l+1} = w_0 h_{l+1} + sum_e w_e expert_e(x_l)`.
//! - The item vector is `Linear(x_L)` (the reference's `com_dense`, here over
//!   one modality), used as both the user encoder's input table and the
//!   scoring table.
//! - User encoder: [`CausalStack`] (SASRec's positions and blocks) and a final
//!   layer norm; the state at each position scores the catalog.
//! - Loss: softmax cross-entropy over the catalog with the logits corrected
//!   by `item_bias = -log p(item)`, and the items of the user's training
//!   sequence other than the row's target left out of the softmax (the
//!   reference's in-batch loss excludes the same items).
//!
//! On moerec's ops (`moerec::candle`), per side layer: [`route`] with k = All
//! over the `1 + E` candidates (the pruned ones masked out), [`expert_layer`]
//! (GELU) and [`expert_layer_rows`] over a dense plan of the active experts,
//! and [`combine_with_utilisation`] with the backbone feature as the residual
//! candidate (`res = h_{l+1}`, `rho = w_0`) and the experts' utilisation; the
//! loss through moerec's fused [`scores`] with the item bias.
//!
//! Choices the paper leaves open (the PyTorch twin, python_ref/models/xsmoe.py, makes the same):
//! - **The frozen item encoder is a fixed content MLP**, not a pretrained
//!   text or image model (none can be downloaded here) and not item-ID
//!   embeddings (IDs pretrained on window 0 would leave every later item
//!   with a random, never trained vector: the catalog grows each window).
//!   From the [`crate::stream::ItemContent`] features `c` (genres, release
//!   year, hashed title tokens): `h_0 = c W_in` (`W_in` N(0, 1/F), F the
//!   feature width), `h_{l+1} = h_l + GELU(h_l A_l) B_l` (`A_l`, `B_l`
//!   N(0, 1/D)), drawn once from the model's seed and never trained. With
//!   F ≤ D the first map loses no content; the encoder is not tuned to the
//!   task, which is what the side network is for. L = 2 layers (the
//!   reference attaches side layers to two hidden states of its encoders).
//! - Router weights N(0, 0.02²), no bias; a new router column (expansion)
//!   is drawn the same way, the old columns kept (the reference draws its
//!   new column with PyTorch's default initialisation).
//! - k = All keeps every active candidate, and moerec orders a token's
//!   slots by selection key; a descending selection bias (`1e6` apart, far
//!   beyond any logit) only fixes that order to candidate order, so slot 0
//!   is the backbone's weight (rho) and slots `1..` are the active experts in
//!   the order of the dense expert plan. The bias does not touch the weights.
//! - Expert rows of a dense plan over all catalog rows are expert-major with
//!   ascending tokens (DESIGN 4.2), so the experts' input residual `x_l` is
//!   `x_l` repeated once per active expert.
//! - The side network runs over the whole catalog every step (about 10^4
//!   items here), so all item vectors are current in every softmax.
//! - `p(item)` is add-one smoothed over the training part of the window
//!   (`(count + 1) / (N + V)`): the full-catalog softmax has items never
//!   rated in it, where `-log 0` is infinite (the reference's in-batch
//!   softmax only meets rated items). The bias is used in training only; the
//!   ranking uses the plain scores, as the reference's. Note that without
//!   in-batch sampling the term is no sampling correction: it pushes the
//!   plain scores towards popular items.
//! - The history excluded from a row's softmax is its training sequence
//!   (at most `max_len + 1` items), not the user's earlier windows: the
//!   reference excludes the same, and the ranking still excludes the whole
//!   history (see [`crate::stream`]).
//! - No dropout in the side network (the reference has none there); the
//!   user encoder's is SASRec's.
//! - Utilisation is `combine`'s (`sum over rows of ||w_e expert_e(x)||`), measured
//!   after a window's training, with its best weights, over the items of the
//!   window's training sequences counted with multiplicity (the reference
//!   accumulates it over the last epoch's training batches, with the last
//!   weights), normalised over the active experts (the backbone left out).

use candle_core::{DType, Device, Tensor, D};
use moerec::candle::{
    combine_with_utilisation, expert_layer, expert_layer_rows, route, scores, RoutingOptions, ScoringOptions,
};
use moerec::experts::Activation;
use moerec::routing::TopK;

use crate::batch::Batch;
use crate::error::{invalid, Result};
use crate::nn::{Dropout, LayerNorm, Linear, Params, INIT_STD};
use crate::rng::Rng;
use crate::sasrec::{CausalStack, EncoderConfig};
use crate::scoring::{CatalogQuery, Mixing};
use crate::stream::{ItemContent, WindowSplit};
use crate::Recommender;

/// Which side network the model has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// No side network: the frozen backbone's last state, projected (baseline).
    BackboneOnly,
    /// A fixed set of experts, all fine-tuned every window (baseline).
    Fixed {
        /// Experts per side layer.
        experts: usize,
    },
    /// XSMoE: after each window the least-utilised expert is pruned if its
    /// share is low, the others are frozen and a new one is added.
    Expandable {
        /// Experts per side layer in the first window.
        experts: usize,
    },
}

/// XSMoE's hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub struct XsmoeConfig {
    /// The user encoder (`num_items` is the whole stream's catalog).
    pub encoder: EncoderConfig,
    /// Frozen backbone layers L (= side layers).
    pub layers: usize,
    /// Experts' bottleneck width (64).
    pub bottleneck: usize,
    /// The side network.
    pub side: Side,
}

impl XsmoeConfig {
    /// The shape: d = 128, 2 blocks, 2 heads, length 10, dropout 0.2,
    /// 2 side layers, bottleneck 64, one expandable expert to start.
    pub fn new(num_items: u32) -> Self {
        Self {
            encoder: EncoderConfig {
                dim: 128,
                max_len: 10,
                ..EncoderConfig::sasrec(num_items)
            },
            layers: 2,
            bottleneck: 64,
            side: Side::Expandable { experts: 1 },
        }
    }
}

/// Standard deviation of the experts' weights (the paper's N(0, 0.01)).
pub const EXPERT_STD: f32 = 0.01;

/// Gap between consecutive candidates' selection bias: fixes k = All's slot
/// order to candidate order (module doc); logits are many orders smaller.
const SLOT_ORDER_GAP: f32 = 1e6;

/// A side layer's experts `(W_down [E, D, b], W_up [E, b, D])`.
pub type ExpertWeights = (Tensor, Tensor);

/// One side layer: the router and the experts, frozen ones first.
struct SideLayer {
    /// `[D, 1 + E]`, column 0 the backbone (trainable).
    router: Tensor,
    /// The frozen experts (constants).
    frozen: Option<ExpertWeights>,
    /// The trainable experts.
    trainable: Option<ExpertWeights>,
    /// Per expert (frozen, then trainable): not pruned.
    active: Vec<bool>,
}

impl SideLayer {
    /// `(W_down [E, D, b], W_up [E, b, D])` over all experts, frozen first.
    fn experts(&self) -> Result<ExpertWeights> {
        let parts: Vec<&ExpertWeights> = self.frozen.iter().chain(&self.trainable).collect();
        let down: Vec<&Tensor> = parts.iter().map(|p| &p.0).collect();
        let up: Vec<&Tensor> = parts.iter().map(|p| &p.1).collect();
        Ok((Tensor::cat(&down, 0)?, Tensor::cat(&up, 0)?))
    }

    fn active_count(&self) -> usize {
        self.active.iter().filter(|&&a| a).count()
    }

    /// `x_{l+1}` and the experts' utilisation `[E]` for `x: [N, D]` with the
    /// backbone feature `backbone: [N, D]`.
    fn forward(&self, x: &Tensor, backbone: &Tensor) -> Result<(Tensor, Tensor)> {
        let device = x.device();
        let (n, _) = x.dims2()?;
        let experts = self.active.len();
        let active = self.active_count();
        let mask: Vec<u32> = self.active.iter().map(|&a| u32::from(a)).collect();
        let candidates_mask: Vec<u32> = std::iter::once(1).chain(mask.iter().copied()).collect();
        let order: Vec<f32> = (0..=experts).map(|c| (experts - c) as f32 * SLOT_ORDER_GAP).collect();
        let routed = route(
            &x.matmul(&self.router)?,
            &RoutingOptions {
                expert_mask: Some(Tensor::from_vec(candidates_mask, experts + 1, device)?),
                selection_bias: Some(Tensor::from_vec(order, experts + 1, device)?),
                ..RoutingOptions::new(TopK::All)
            },
        )?;
        let rho = routed.weights.narrow(1, 0, 1)?.squeeze(1)?;
        let weights = routed.weights.narrow(1, 1, active)?;
        // Every catalog row to every active expert: the plan of a k = All
        // route does not depend on the logits.
        let dense = route(
            &Tensor::zeros((n, experts), DType::F32, device)?,
            &RoutingOptions {
                expert_mask: Some(Tensor::from_vec(mask, experts, device)?),
                ..RoutingOptions::new(TopK::All)
            },
        )?;
        let (down, up) = self.experts()?;
        let hidden = expert_layer(x, &dense.plan, &down, None, Activation::Gelu)?;
        let delta = expert_layer_rows(&hidden, &dense.plan, &up, None, Activation::None)?;
        let inputs = Tensor::cat(&vec![x; active], 0)?;
        let y = (delta + inputs)?;
        Ok(combine_with_utilisation(
            &y,
            &weights,
            &dense.plan,
            Some(backbone),
            Some(&rho),
        )?)
    }
}

/// The XSMoE model (and its two baselines, by [`Side`]).
pub struct Xsmoe {
    params: Params,
    config: XsmoeConfig,
    /// `L + 1` frozen states `[N + 1, D]` of every item of the stream.
    backbone: Vec<Tensor>,
    stack: CausalStack,
    final_norm: LayerNorm,
    item_proj: Linear,
    side: Vec<SideLayer>,
    /// Items of the current window's catalog (`1..=catalog`).
    catalog: usize,
    /// `[catalog + 1]` `-log p(item)` of the current window.
    item_bias: Option<Tensor>,
    rng: Rng,
}

impl Xsmoe {
    /// A freshly initialised model over `content`'s items; the same seed
    /// gives the same weights, and the backbone and user encoder do not
    /// depend on [`Side`] (the variants start alike).
    pub fn new(config: XsmoeConfig, content: &ItemContent, seed: u64, device: &Device) -> Result<Self> {
        let dim = config.encoder.dim;
        let rows = content.features.len() / content.width.max(1);
        if content.width == 0 || rows < 2 || rows != config.encoder.num_items as usize + 1 {
            return Err(invalid(
                "item content",
                format!(
                    "{} rows (padding + num_items) of non-zero width",
                    config.encoder.num_items + 1
                ),
                format!("{rows} rows of width {}", content.width),
            ));
        }
        if config.layers == 0 || config.bottleneck == 0 {
            return Err(invalid(
                "layers and bottleneck",
                "at least 1 each",
                format!("{config:?}"),
            ));
        }
        let experts = match config.side {
            Side::BackboneOnly => 0,
            Side::Fixed { experts } | Side::Expandable { experts } => experts,
        };
        if experts == 0 && config.side != Side::BackboneOnly {
            return Err(invalid("experts", "at least 1 per side layer", 0));
        }
        let mut rng = Rng::new(seed);
        let backbone = frozen_backbone(content, dim, config.layers, &mut rng, device)?;
        let mut params = Params::new();
        let stack = CausalStack::new(&mut params, &config.encoder, &mut rng, device)?;
        let final_norm = LayerNorm::new(&mut params, "final_norm", dim, device)?;
        let item_proj = Linear::new(&mut params, "item_proj", (dim, dim), &mut rng, device)?;
        let mut side = Vec::new();
        if experts > 0 {
            for l in 0..config.layers {
                let router = params.normal(
                    &format!("side{l}.router"),
                    &[dim, experts + 1],
                    INIT_STD,
                    &mut rng,
                    device,
                )?;
                let down = params.normal(
                    &format!("side{l}.down"),
                    &[experts, dim, config.bottleneck],
                    EXPERT_STD,
                    &mut rng,
                    device,
                )?;
                let up = params.normal(
                    &format!("side{l}.up"),
                    &[experts, config.bottleneck, dim],
                    EXPERT_STD,
                    &mut rng,
                    device,
                )?;
                side.push(SideLayer {
                    router,
                    frozen: None,
                    trainable: Some((down, up)),
                    active: vec![true; experts],
                });
            }
        }
        Ok(Self {
            params,
            catalog: rows - 1,
            item_bias: None,
            backbone,
            stack,
            final_norm,
            item_proj,
            side,
            config,
            rng,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &XsmoeConfig {
        &self.config
    }

    /// Active experts per side layer (empty without a side network).
    pub fn experts(&self) -> Vec<usize> {
        self.side.iter().map(SideLayer::active_count).collect()
    }

    /// Restricts the catalog to `split`'s items and sets `-log p(item)` from
    /// its training popularity (add-one smoothed).
    pub fn set_window(&mut self, split: &WindowSplit) -> Result<()> {
        let catalog = split.num_items as usize;
        let all = self.backbone[0].dim(0)? - 1;
        if catalog == 0 || catalog > all || split.popularity.len() != catalog + 1 {
            return Err(invalid(
                "window split",
                format!("1..={all} items with as many popularity counts (+ padding)"),
                format!("{catalog} items, {} counts", split.popularity.len()),
            ));
        }
        let total: f64 = split.popularity[1..].iter().map(|&c| c as f64).sum::<f64>() + catalog as f64;
        let bias: Vec<f32> = std::iter::once(0.0)
            .chain(
                split.popularity[1..]
                    .iter()
                    .map(|&c| -((c as f64 + 1.0) / total).ln() as f32),
            )
            .collect();
        self.item_bias = Some(Tensor::from_vec(bias, catalog + 1, self.backbone[0].device())?);
        self.catalog = catalog;
        Ok(())
    }

    /// The frozen backbone's states of the current catalog (`L + 1` of `[V+1, D]`).
    pub fn backbone(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .backbone
            .iter()
            .map(|h| h.narrow(0, 0, self.catalog + 1))
            .collect::<candle_core::Result<_>>()?)
    }

    /// The current `-log p(item)` (`None` before [`Self::set_window`]).
    pub fn item_bias(&self) -> Option<&Tensor> {
        self.item_bias.as_ref()
    }

    /// Per side layer: the frozen experts' weights (if any) and the active mask.
    pub fn frozen_experts(&self) -> Vec<(Option<ExpertWeights>, Vec<bool>)> {
        self.side.iter().map(|s| (s.frozen.clone(), s.active.clone())).collect()
    }

    /// The side network over backbone rows `ids` (`[N]` u32): the output
    /// `[N, D]` and each layer's utilisation `[E]`.
    fn side_forward(&self, states: &[Tensor], ids: Option<&Tensor>) -> Result<(Tensor, Vec<Tensor>)> {
        let pick = |h: &Tensor| -> Result<Tensor> {
            Ok(match ids {
                Some(ids) => h.index_select(ids, 0)?,
                None => h.clone(),
            })
        };
        let mut x = pick(&states[0])?;
        if self.side.is_empty() {
            return Ok((pick(&states[self.config.layers])?, Vec::new()));
        }
        let mut utilisation = Vec::new();
        for (l, layer) in self.side.iter().enumerate() {
            let (next, util) = layer.forward(&x, &pick(&states[l + 1])?)?;
            x = next;
            utilisation.push(util);
        }
        Ok((x, utilisation))
    }

    /// `[V+1, D]` item vectors of the current catalog.
    pub fn item_table(&self) -> Result<Tensor> {
        let (x, _) = self.side_forward(&self.backbone()?, None)?;
        self.item_proj.forward(&x)
    }

    /// Each side layer's utilisation normalised over its active experts,
    /// measured over `items` (ids with multiplicity, `1..=catalog`).
    pub fn utilisation(&self, items: &[u32]) -> Result<Vec<Vec<f64>>> {
        if let Some(&bad) = items.iter().find(|&&i| i == 0 || i as usize > self.catalog) {
            return Err(invalid("item", format!("an id in 1..={}", self.catalog), bad));
        }
        if items.is_empty() || self.side.is_empty() {
            return Ok(vec![Vec::new(); self.side.len()]);
        }
        let ids = Tensor::new(items, self.backbone[0].device())?;
        let (_, utilisation) = self.side_forward(&self.backbone()?, Some(&ids))?;
        utilisation
            .iter()
            .map(|u| {
                let u: Vec<f64> = u.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
                let total: f64 = u.iter().sum();
                Ok(u.iter().map(|v| if total > 0.0 { v / total } else { 0.0 }).collect())
            })
            .collect()
    }

    /// Per side layer: masks out the active expert with the smallest share
    /// of `utilisation` (as [`Self::utilisation`] gives) if that share is
    /// below `threshold` and another expert stays; returns the pruned indices.
    pub fn prune(&mut self, utilisation: &[Vec<f64>], threshold: f64) -> Result<Vec<Option<usize>>> {
        if utilisation.len() != self.side.len() {
            return Err(invalid(
                "utilisation",
                format!("{} layers", self.side.len()),
                utilisation.len(),
            ));
        }
        let mut pruned = Vec::new();
        for (l, (layer, util)) in self.side.iter_mut().zip(utilisation).enumerate() {
            if util.len() != layer.active.len() {
                return Err(invalid(
                    "utilisation",
                    format!("{} experts at layer {l}", layer.active.len()),
                    util.len(),
                ));
            }
            let least = (0..util.len())
                .filter(|&e| layer.active[e])
                .min_by(|&a, &b| util[a].total_cmp(&util[b]));
            let prune = least.filter(|&e| util[e] < threshold && layer.active_count() > 1);
            if let Some(e) = prune {
                layer.active[e] = false;
            }
            pruned.push(prune);
        }
        Ok(pruned)
    }

    /// Freezes every expert and adds one per side layer initialised to the
    /// mean of the active experts; each router gains a column.
    pub fn expand(&mut self) -> Result<()> {
        let device = self.backbone[0].device().clone();
        let dim = self.config.encoder.dim;
        for (l, layer) in self.side.iter_mut().enumerate() {
            let (down_name, up_name, router_name) = (
                format!("side{l}.down"),
                format!("side{l}.up"),
                format!("side{l}.router"),
            );
            let (down, up) = layer.experts()?;
            let (down, up) = (down.detach().copy()?, up.detach().copy()?);
            if layer.trainable.take().is_some() {
                self.params.remove(&down_name)?;
                self.params.remove(&up_name)?;
            }
            let active: Vec<u32> = (0..layer.active.len() as u32)
                .filter(|&e| layer.active[e as usize])
                .collect();
            let picked = Tensor::new(active.as_slice(), &device)?;
            let mean = |w: &Tensor| -> Result<Tensor> { Ok(w.index_select(&picked, 0)?.mean_keepdim(0)?) };
            let new_down = self.params.add(&down_name, mean(&down)?)?;
            let new_up = self.params.add(&up_name, mean(&up)?)?;
            layer.frozen = Some((down, up));
            layer.trainable = Some((new_down, new_up));
            layer.active.push(true);
            let old = self.params.remove(&router_name)?.as_tensor().detach().copy()?;
            let column: Vec<f32> = (0..dim).map(|_| self.rng.normal() * INIT_STD).collect();
            let column = Tensor::from_vec(column, (dim, 1), &device)?;
            layer.router = self.params.add(&router_name, Tensor::cat(&[&old, &column], 1)?)?;
        }
        Ok(())
    }

    /// Freezes the current experts and adds one per side layer, after
    /// pruning by `utilisation` below `threshold`: the step between windows
    /// of [`Side::Expandable`]; the baselines stay as they are.
    pub fn next_window(&mut self, utilisation: &[Vec<f64>], threshold: f64) -> Result<Vec<Option<usize>>> {
        match self.config.side {
            Side::Expandable { .. } => {
                let pruned = self.prune(utilisation, threshold)?;
                self.expand()?;
                Ok(pruned)
            }
            _ => Ok(vec![None; self.side.len()]),
        }
    }

    /// Training rows' softmax exclusions: `[R, V+1]`, -inf at the items of
    /// the row's sequence (inputs and targets) other than its target.
    fn history_mask(&self, batch: &Batch, rows: &[u32], targets: &[u32]) -> Result<Tensor> {
        let inputs = batch.inputs.to_vec2::<u32>()?;
        let mut seen: Vec<Vec<u32>> = inputs
            .iter()
            .map(|seq| seq.iter().copied().filter(|&i| i != 0).collect())
            .collect();
        for (&row, &target) in rows.iter().zip(targets) {
            seen[row as usize / batch.width].push(target);
        }
        let width = self.catalog + 1;
        let mut mask = vec![0f32; rows.len() * width];
        for (r, (&row, &target)) in rows.iter().zip(targets).enumerate() {
            for &item in &seen[row as usize / batch.width] {
                if item != target {
                    mask[r * width + item as usize] = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Tensor::from_vec(mask, (rows.len(), width), batch.inputs.device())?)
    }
}

/// The fixed content MLP (module doc): `L + 1` states `[N + 1, D]`, row 0 zero.
fn frozen_backbone(
    content: &ItemContent,
    dim: usize,
    layers: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<Vec<Tensor>> {
    let width = content.width;
    let rows = content.features.len() / width;
    let mut draw = |fan_in: usize, fan_out: usize| -> Result<Tensor> {
        let std = 1.0 / (fan_in as f32).sqrt();
        let values: Vec<f32> = (0..fan_in * fan_out).map(|_| rng.normal() * std).collect();
        Ok(Tensor::from_vec(values, (fan_in, fan_out), device)?)
    };
    let features = Tensor::from_vec(content.features.clone(), (rows, width), device)?;
    let mut states = vec![features.matmul(&draw(width, dim)?)?];
    for _ in 0..layers {
        let (a, b) = (draw(dim, dim)?, draw(dim, dim)?);
        let h = states.last().expect("one state at least");
        // Padding (row 0) stays zero: GELU(0) = 0.
        states.push((h + h.matmul(&a)?.gelu_erf()?.matmul(&b)?)?);
    }
    Ok(states)
}

impl Recommender for Xsmoe {
    fn params(&self) -> &Params {
        &self.params
    }

    fn dropout_rate(&self) -> f32 {
        self.config.encoder.dropout
    }

    fn query(&self, batch: &Batch, rows: &Tensor, dropout: &mut Dropout) -> Result<CatalogQuery> {
        let items = self.item_table()?;
        let hidden = self.final_norm.forward(&self.stack.forward(&items, batch, dropout)?)?;
        let user = hidden
            .reshape((batch.size * batch.width, self.config.encoder.dim))?
            .index_select(rows, 0)?
            .unsqueeze(1)?;
        Ok(CatalogQuery {
            user,
            gate_logits: None,
            items,
            mixing: Mixing::Logits,
            scale: 1.0,
        })
    }

    fn loss(&self, batch: &Batch, rows: &Tensor, targets: &Tensor, dropout: &mut Dropout) -> Result<Tensor> {
        let (row_ids, target_ids) = (rows.to_vec1::<u32>()?, targets.to_vec1::<u32>()?);
        if let Some(&bad) = target_ids.iter().find(|&&t| t == 0 || t as usize > self.catalog) {
            return Err(invalid("target", format!("an item id in 1..={}", self.catalog), bad));
        }
        let query = self.query(batch, rows, dropout)?;
        let device = query.user.device();
        let options = ScoringOptions {
            item_bias: self.item_bias.clone(),
            excluded: Some(Tensor::new(&[0u32], device)?),
            ..ScoringOptions::default()
        };
        let gates = Tensor::zeros((row_ids.len(), 1), DType::F32, device)?;
        // [R, V+1] logits (+ item bias), -inf at padding and the row's own history.
        let logits = (scores(&query.user, &gates, &query.items, &options)?
            + self.history_mask(batch, &row_ids, &target_ids)?)?;
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
        let target = logits.gather(&targets.unsqueeze(1)?, 1)?;
        Ok((lse - target)?.mean_all()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(items: usize, width: usize) -> ItemContent {
        let mut rng = Rng::new(3);
        let mut features: Vec<f32> = (0..(items + 1) * width).map(|_| rng.uniform()).collect();
        features[..width].fill(0.0);
        ItemContent {
            features,
            width,
            genres: Vec::new(),
        }
    }

    fn small(side: Side) -> Xsmoe {
        let mut config = XsmoeConfig::new(12);
        config.encoder.dim = 8;
        config.bottleneck = 4;
        config.side = side;
        Xsmoe::new(config, &content(12, 5), 1, &Device::Cpu).unwrap()
    }

    #[test]
    fn expansion_freezes_prunes_and_averages() {
        let mut model = small(Side::Expandable { experts: 2 });
        assert_eq!(model.experts(), vec![2, 2]);
        let (down, _) = model.side[0].experts().unwrap();
        let mean = down.mean_keepdim(0).unwrap();
        model.expand().unwrap();
        assert_eq!(model.experts(), vec![3, 3]);
        // The new expert is the old ones' mean and the only trainable one.
        let (new_down, _) = model.side[0].trainable.clone().unwrap();
        let diff = (new_down - mean).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(model.params.vars()["side0.down"].dims(), &[1, 8, 4]);
        assert_eq!(model.params.vars()["side1.router"].dims(), &[8, 4]);
        // Expert 1 takes 5% of layer 0: pruned; layer 1 is balanced: kept.
        let pruned = model.prune(&[vec![0.5, 0.05, 0.45], vec![0.3, 0.3, 0.4]], 0.1).unwrap();
        assert_eq!(pruned, vec![Some(1), None]);
        assert_eq!(model.experts(), vec![2, 3]);
        // The pruned expert gets no utilisation and the next one averages the other two.
        let util = model.utilisation(&[1, 2, 2, 7]).unwrap();
        assert_eq!(util[0][1], 0.0);
        assert!((util[0].iter().sum::<f64>() - 1.0).abs() < 1e-6);
        model.expand().unwrap();
        assert_eq!(model.experts(), vec![3, 4]);
        assert!(model.prune(&[vec![1.0]], 0.1).is_err());
        assert!(model.utilisation(&[13]).is_err());
    }

    #[test]
    fn a_single_expert_and_the_baselines_are_never_pruned() {
        let mut model = small(Side::Expandable { experts: 1 });
        assert_eq!(model.prune(&[vec![0.0], vec![0.0]], 0.1).unwrap(), vec![None, None]);
        let mut fixed = small(Side::Fixed { experts: 2 });
        assert_eq!(
            fixed.next_window(&[vec![0.0, 1.0], vec![0.0, 1.0]], 0.1).unwrap(),
            vec![None, None]
        );
        assert_eq!(fixed.experts(), vec![2, 2]);
        assert!(small(Side::BackboneOnly).experts().is_empty());
    }
}
