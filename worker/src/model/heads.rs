//! Output heads: masked gene-expression modelling, the contrastive projection and the
//! GEPC expression decoder.

use scfm_common::config::GepcDecoder;
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
    /// Parameters: `fc1.*` (`cell` → `hidden`), `fc2.*` (`hidden` → `dim`).
    pub fn new(p: &nn::Path, cell: i64, hidden: i64, dim: i64) -> Self {
        ProjectionHead {
            fc1: init::linear(&(p / "fc1"), cell, hidden),
            fc2: init::linear(&(p / "fc2"), hidden, dim),
        }
    }

    /// `[N, C]` → `[N, dim]` with unit rows.
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

/// GEPC expression decoder: the log1p-normalised (or standardised) expression of gene `g`
/// in a cell is predicted from the cell embedding `c` alone, for every vocabulary gene,
/// in one of two forms ([`GepcDecoder`]): scGPT's MVC, `⟨cell(c), σ(gene(e_g))⟩ + bias_g`
/// with `e_g` the gene's token embedding (shared with the input), or a linear map with
/// its own weights per gene, `weight_g · c + bias_g`. With `model.gepc_detected`, plus
/// `detected_g · d` for the cell's genes-detected covariate `d` (see
/// [`detected_covariate`]).
#[derive(Debug)]
pub struct GepcHead {
    map: GepcMap,
    bias: Tensor,
    detected: Option<Tensor>,
}

/// The two decoder forms of [`GepcHead`].
#[derive(Debug)]
enum GepcMap {
    /// `⟨cell(c), σ(gene(e_g))⟩`.
    GeneQuery { cell: nn::Linear, gene: nn::Linear },
    /// `weight[g] · c` with `weight` `[G, H]`.
    PerGene { weight: Tensor },
}

/// The centre of the genes-detected covariate: `ln(1 + 147)`, a typical cell.
pub const DETECTED_CENTRE: f64 = 5.0;

/// The GEPC decoder's genes-detected covariate of a profile row: `ln(1 + n) − 5`, where
/// `n` counts the row's values above 0 (in the log1p-normalised profile, before any
/// standardisation).
pub fn detected_covariate(values: &[f32]) -> f32 {
    let n = values.iter().filter(|&&v| v > 0.0).count();
    ((1.0 + n as f64).ln() - DETECTED_CENTRE) as f32
}

impl GepcHead {
    /// Parameters: `cell.*` (`cell` → `hidden`) and `gene.*` (gene query) or `weight`
    /// `[G, cell]` (per gene), `bias` (one per vocabulary gene) and, with `detected`,
    /// `detected` (one slope per vocabulary gene, zero at start). `cell` is the cell
    /// embedding's size, `hidden` the token embedding's.
    pub fn new(
        p: &nn::Path,
        cell: i64,
        hidden: i64,
        n_genes: i64,
        detected: bool,
        form: GepcDecoder,
    ) -> Self {
        let map = match form {
            GepcDecoder::GeneQuery => GepcMap::GeneQuery {
                cell: init::linear(&(p / "cell"), cell, hidden),
                gene: init::linear(&(p / "gene"), hidden, hidden),
            },
            GepcDecoder::PerGene => GepcMap::PerGene {
                weight: p.var("weight", &[n_genes, cell], init::normal()),
            },
        };
        GepcHead {
            map,
            bias: p.var("bias", &[n_genes], nn::Init::Const(0.0)),
            detected: detected.then(|| p.var("detected", &[n_genes], nn::Init::Const(0.0))),
        }
    }

    /// The decoder's linear map of the cell embedding, `[C, G]`: the prediction is
    /// `cell · map + bias (+ the genes-detected term)`, with `map` `weightᵀ` (per gene) or
    /// `cell.weightᵀ · σ(gene(genes))ᵀ` (gene query; `cell.bias` only shifts every cell's
    /// prediction alike).
    pub fn linear_map(&self, genes: &Tensor) -> Tensor {
        match &self.map {
            GepcMap::GeneQuery { cell: c, gene } => {
                let query = genes.apply(gene).sigmoid();
                c.ws.transpose(0, 1).matmul(&query.transpose(0, 1))
            }
            GepcMap::PerGene { weight } => weight.transpose(0, 1),
        }
    }

    /// `cell` `[N, C]`, `genes` the gene rows of the token table `[G, H]`, and the cells'
    /// genes-detected covariates `[N]` (used when the head has the slopes; without
    /// covariates the term is left out, as for a cell of the centre) → `[N, G]`.
    pub fn forward(&self, cell: &Tensor, genes: &Tensor, detected: Option<&Tensor>) -> Tensor {
        let pred = match &self.map {
            GepcMap::GeneQuery { cell: c, gene } => {
                let query = genes.apply(gene).sigmoid();
                cell.apply(c).matmul(&query.transpose(0, 1))
            }
            GepcMap::PerGene { weight } => cell.matmul(&weight.transpose(0, 1)),
        } + &self.bias;
        match (&self.detected, detected) {
            (Some(w), Some(d)) => pred + d.unsqueeze(-1) * w.unsqueeze(0),
            _ => pred,
        }
    }
}
