//! Losses: MGEM (cross-entropy over bins or MSE) and NT-Xent.

use tch::{Kind, Reduction, Tensor};

/// Cross-entropy of `logits` `[N, L, C]` against `targets` `[N, L]` over the `masked`
/// positions only, mean over them, with label smoothing.
pub fn mgem_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    masked: &Tensor,
    label_smoothing: f64,
) -> Tensor {
    let c = logits.size()[2];
    let sel = logits.masked_select(&masked.unsqueeze(-1)).view([-1, c]);
    let t = targets.masked_select(masked);
    sel.cross_entropy_loss::<Tensor>(&t, None, Reduction::Mean, -100, label_smoothing)
}

/// Mean squared error of `pred` `[N, L, 1]` against `targets` `[N, L]` over `masked`.
pub fn mgem_mse(pred: &Tensor, targets: &Tensor, masked: &Tensor) -> Tensor {
    let p = pred.squeeze_dim(-1).masked_select(masked);
    let t = targets.masked_select(masked);
    p.mse_loss(&t, Reduction::Mean)
}

/// NT-Xent (SimCLR) over `z` `[2B, D]` of unit rows, where rows `i` and `i + B` are
/// the two views of one cell: the mean over all 2B anchors of
/// `-log softmax(z zᵀ / τ)[i, pair(i)]` with self-similarity excluded.
pub fn nt_xent(z: &Tensor, temperature: f64) -> Tensor {
    let n2 = z.size()[0];
    assert!(
        n2 % 2 == 0 && n2 >= 2,
        "nt_xent needs an even number of rows"
    );
    let b = n2 / 2;
    let sim = z.matmul(&z.transpose(0, 1)) / temperature;
    let eye = Tensor::eye(n2, (Kind::Bool, z.device()));
    let sim = sim.masked_fill(&eye, f64::NEG_INFINITY);
    let idx = Tensor::arange(n2, (Kind::Int64, z.device()));
    let targets = (&idx + b).remainder(n2);
    sim.cross_entropy_loss::<Tensor>(&targets, None, Reduction::Mean, -100, 0.0)
}

/// NT-Xent over a global batch laid out as `blocks` equal blocks (one per worker), each
/// holding `2b` rows where rows `j` and `j + b` of a block are the two views of one cell.
/// Negatives come from every block; the mean runs over all anchors. With one block this
/// is [`nt_xent`].
pub fn nt_xent_blocks(z: &Tensor, temperature: f64, blocks: i64) -> Tensor {
    let n = z.size()[0];
    assert!(
        blocks >= 1 && n % (2 * blocks) == 0,
        "nt_xent_blocks: {n} rows do not split into {blocks} blocks of view pairs"
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

/// Sum (not mean) of the MGEM cross-entropy over the masked tokens, with label smoothing.
pub fn mgem_cross_entropy_sum(
    logits: &Tensor,
    targets: &Tensor,
    masked: &Tensor,
    label_smoothing: f64,
) -> Tensor {
    let c = logits.size()[2];
    let sel = logits.masked_select(&masked.unsqueeze(-1)).view([-1, c]);
    let t = targets.masked_select(masked);
    sel.cross_entropy_loss::<Tensor>(&t, None, Reduction::Sum, -100, label_smoothing)
}

/// Sum of squared errors over the masked tokens.
pub fn mgem_sse(pred: &Tensor, targets: &Tensor, masked: &Tensor) -> Tensor {
    let p = pred.squeeze_dim(-1).masked_select(masked);
    let t = targets.masked_select(masked);
    p.mse_loss(&t, Reduction::Sum)
}
