//! Losses: MGEM (cross-entropy over bins or squared error) and NT-Xent.

use tch::{Kind, Reduction, Tensor};

/// Cross-entropy of `logits` `[N, L, C]` against `targets` `[N, L]` over the `masked`
/// positions only, with label smoothing; `reduction` is `Mean` (over the masked tokens)
/// or `Sum`.
pub fn mgem_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    masked: &Tensor,
    label_smoothing: f64,
    reduction: Reduction,
) -> Tensor {
    let c = logits.size()[2];
    let sel = logits.masked_select(&masked.unsqueeze(-1)).view([-1, c]);
    cross_entropy_selected(
        &sel,
        &targets.masked_select(masked),
        label_smoothing,
        reduction,
    )
}

/// Cross-entropy of already selected logits `[M, C]` against targets `[M]`.
pub fn cross_entropy_selected(
    logits: &Tensor,
    targets: &Tensor,
    label_smoothing: f64,
    reduction: Reduction,
) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(targets, None, reduction, -100, label_smoothing)
}

/// Squared error of `pred` `[N, L, 1]` against `targets` `[N, L]` over `masked`;
/// `reduction` is `Mean` (MSE) or `Sum`.
pub fn mgem_squared_error(
    pred: &Tensor,
    targets: &Tensor,
    masked: &Tensor,
    reduction: Reduction,
) -> Tensor {
    let p = pred.squeeze_dim(-1).masked_select(masked);
    let t = targets.masked_select(masked);
    p.mse_loss(&t, reduction)
}

/// NT-Xent (SimCLR) over `z` `[2B, D]` of unit rows, where rows `i` and `i + B` are
/// the two views of one cell: the mean over all 2B anchors of
/// `-log softmax(z zᵀ / τ)[i, pair(i)]` with self-similarity excluded.
pub fn nt_xent(z: &Tensor, temperature: f64) -> Tensor {
    nt_xent_blocks(z, temperature, 1)
}

/// NT-Xent over a global batch laid out as `blocks` equal blocks (one per worker), each
/// holding `2b` rows where rows `j` and `j + b` of a block are the two views of one cell.
/// Negatives come from every block; the mean runs over all anchors. With one block this
/// is [`nt_xent`].
pub fn nt_xent_blocks(z: &Tensor, temperature: f64, blocks: i64) -> Tensor {
    let n = z.size()[0];
    assert!(
        blocks >= 1 && n >= 2 && n % (2 * blocks) == 0,
        "nt_xent: {n} rows do not split into {blocks} blocks of view pairs"
    );
    let per = n / blocks;
    let b = per / 2;
    let sim = z.matmul(&z.transpose(0, 1)) / temperature;
    let eye = Tensor::eye(n, (Kind::Bool, z.device()));
    let sim = sim.masked_fill(&eye, f64::NEG_INFINITY);
    let idx = Tensor::arange(n, (Kind::Int64, z.device()));
    let start = idx.divide_scalar_mode(per, "floor") * per;
    let targets = &start + (&idx - &start + b).remainder(per);
    sim.cross_entropy_loss::<Tensor>(&targets, None, Reduction::Mean, -100, 0.0)
}
