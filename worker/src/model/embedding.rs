//! Token embedding: gene id + expression (+ position), LayerNorm, dropout.

use scfm_common::config::{ExpressionEncoding, ModelConfig, Positional};
use tch::{Kind, Tensor, nn};

use super::init;

/// How expression values are embedded.
#[derive(Debug)]
enum Expr {
    /// Table of `n_bins + 1` rows (the last is the MASK bin).
    Binned(Tensor),
    /// `fc2(gelu(fc1(value)))`, with a learned vector replacing masked values.
    Continuous {
        fc1: nn::Linear,
        fc2: nn::Linear,
        mask: Tensor,
    },
}

/// The embedding block.
#[derive(Debug)]
pub struct TokenEmbedding {
    gene: Tensor,
    expr: Expr,
    pos: Option<Tensor>,
    norm: nn::LayerNorm,
    dropout: f64,
}

/// Fixed sinusoidal table `[len, hidden]` (sin on even, cos on odd features).
pub fn sinusoidal_table(len: usize, hidden: usize, device: tch::Device) -> Tensor {
    let pos = Tensor::arange(len as i64, (Kind::Float, device)).unsqueeze(1);
    let i = Tensor::arange_start_step(0, hidden as i64, 2, (Kind::Float, device));
    let div = (i * (-(10000f64.ln()) / hidden as f64)).exp();
    let angles = pos * div.unsqueeze(0); // [len, ceil(h/2)]
    let table = Tensor::zeros([len as i64, hidden as i64], (Kind::Float, device));
    let n_odd = (hidden / 2) as i64;
    table.slice(1, 0, hidden as i64, 2).copy_(&angles.sin());
    table
        .slice(1, 1, hidden as i64, 2)
        .copy_(&angles.cos().narrow(1, 0, n_odd));
    table
}

impl TokenEmbedding {
    /// Creates the parameters under `p` (`gene.weight`, `expr.*`, `pos.weight`, `norm.*`).
    pub fn new(p: &nn::Path, cfg: &ModelConfig, n_tokens: usize) -> Self {
        let h = cfg.hidden as i64;
        let gene = (p / "gene").var("weight", &[n_tokens as i64, h], init::normal());
        let expr = match cfg.expression {
            ExpressionEncoding::Binned => Expr::Binned((p / "expr").var(
                "weight",
                &[cfg.n_bins as i64 + 1, h],
                init::normal(),
            )),
            ExpressionEncoding::Continuous => {
                let e = p / "expr";
                Expr::Continuous {
                    fc1: init::linear(&(&e / "fc1"), 1, h),
                    fc2: init::linear(&(&e / "fc2"), h, h),
                    mask: e.var("mask", &[h], init::normal()),
                }
            }
        };
        let pos = match cfg.positional {
            Positional::None => None,
            Positional::Learned => {
                Some((p / "pos").var("weight", &[cfg.max_seq_len as i64, h], init::normal()))
            }
            Positional::Sinusoidal => {
                Some(sinusoidal_table(cfg.max_seq_len, cfg.hidden, p.device()))
            }
        };
        let norm = nn::layer_norm(p / "norm", vec![h], Default::default());
        TokenEmbedding {
            gene,
            expr,
            pos,
            norm,
            dropout: cfg.dropout,
        }
    }

    /// The gene-token table `[n_tokens, H]` (rows below `OFFSET` are PAD and `[CLS]`).
    pub fn gene_table(&self) -> &Tensor {
        &self.gene
    }

    /// `genes`, `bins` `[N, L]` int64; `values` `[N, L]` float; `masked` `[N, L]` bool.
    // Out-of-place additions on purpose: `+=` would run in place on autograd values.
    #[allow(clippy::assign_op_pattern)]
    pub fn forward(
        &self,
        genes: &Tensor,
        bins: &Tensor,
        values: &Tensor,
        masked: &Tensor,
        train: bool,
    ) -> Tensor {
        // Sparse gradient: only the rows of genes in the batch are touched in backward; it is
        // accumulated into the dense flat gradient buffer (see params.rs).
        let mut x = Tensor::embedding(&self.gene, genes, -1, false, true);
        x = x + match &self.expr {
            Expr::Binned(table) => Tensor::embedding(table, bins, -1, false, false),
            Expr::Continuous { fc1, fc2, mask } => {
                let e = values.unsqueeze(-1).apply(fc1).gelu("none").apply(fc2);
                e.where_self(&masked.logical_not().unsqueeze(-1), mask)
            }
        };
        if let Some(pos) = &self.pos {
            let len = genes.size()[1];
            x = x + pos.narrow(0, 0, len).unsqueeze(0);
        }
        x.apply(&self.norm).dropout(self.dropout, train)
    }
}
