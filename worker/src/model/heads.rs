//! Output heads: masked gene-expression modelling and the contrastive projection.

use tch::{Tensor, nn};

use super::init;

/// MGEM head: `out(ln(gelu(dense(x))))` → `n_bins` logits (binned) or 1 value (continuous).
#[derive(Debug)]
pub struct MgemHead {
    dense: nn::Linear,
    norm: nn::LayerNorm,
    out: nn::Linear,
}

impl MgemHead {
    /// Parameters: `dense.*`, `norm.*`, `out.*`.
    pub fn new(p: &nn::Path, hidden: i64, n_out: i64) -> Self {
        MgemHead {
            dense: init::linear(&(p / "dense"), hidden, hidden),
            norm: nn::layer_norm(p / "norm", vec![hidden], Default::default()),
            out: init::linear(&(p / "out"), hidden, n_out),
        }
    }

    /// `[N, L, H]` → `[N, L, n_out]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.apply(&self.dense)
            .gelu("none")
            .apply(&self.norm)
            .apply(&self.out)
    }
}

/// Contrastive projection: `fc2(relu(fc1(cell)))`, L2-normalised.
#[derive(Debug)]
pub struct ProjectionHead {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl ProjectionHead {
    /// Parameters: `fc1.*`, `fc2.*`.
    pub fn new(p: &nn::Path, hidden: i64, dim: i64) -> Self {
        ProjectionHead {
            fc1: init::linear(&(p / "fc1"), hidden, hidden),
            fc2: init::linear(&(p / "fc2"), hidden, dim),
        }
    }

    /// `[N, H]` → `[N, dim]` with unit rows.
    pub fn forward(&self, cell: &Tensor) -> Tensor {
        l2_normalize(&cell.apply(&self.fc1).relu().apply(&self.fc2))
    }
}

/// Rows divided by `max(‖row‖₂, 1e-12)`, as `torch.nn.functional.normalize`.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let norm = x
        .norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)
        .clamp_min(1e-12);
    x / norm
}

/// GEPC expression decoder (scGPT's MVC): the log1p-normalised expression of gene `g` in
/// a cell is predicted as `⟨cell(c), σ(gene(e_g))⟩ + bias_g` from the cell embedding `c`
/// and the gene's token embedding `e_g` (shared with the input), for every vocabulary gene.
#[derive(Debug)]
pub struct GepcHead {
    cell: nn::Linear,
    gene: nn::Linear,
    bias: Tensor,
}

impl GepcHead {
    /// Parameters: `cell.*`, `gene.*`, `bias` (one per vocabulary gene).
    pub fn new(p: &nn::Path, hidden: i64, n_genes: i64) -> Self {
        GepcHead {
            cell: init::linear(&(p / "cell"), hidden, hidden),
            gene: init::linear(&(p / "gene"), hidden, hidden),
            bias: p.var("bias", &[n_genes], nn::Init::Const(0.0)),
        }
    }

    /// `cell` `[N, H]`, `genes` the gene rows of the token table `[G, H]` → `[N, G]`.
    pub fn forward(&self, cell: &Tensor, genes: &Tensor) -> Tensor {
        let query = genes.apply(&self.gene).sigmoid();
        cell.apply(&self.cell).matmul(&query.transpose(0, 1)) + &self.bias
    }
}
