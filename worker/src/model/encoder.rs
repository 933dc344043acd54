//! Pre-LayerNorm transformer encoder with fused scaled-dot-product attention.

use tch::{Kind, Tensor, nn};

use super::init;

/// One pre-LN block: `x + drop(attn(ln1(x)))`, then `x + drop(ffn(ln2(x)))`.
#[derive(Debug)]
pub struct Block {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    out: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    n_heads: i64,
    dropout: f64,
}

impl Block {
    /// Parameters: `norm1.*`, `attn.qkv.*`, `attn.out.*`, `norm2.*`, `ffn.fc1.*`, `ffn.fc2.*`.
    pub fn new(p: &nn::Path, hidden: i64, n_heads: i64, ffn_dim: i64, dropout: f64) -> Self {
        Block {
            norm1: nn::layer_norm(p / "norm1", vec![hidden], Default::default()),
            qkv: init::linear(&(p / "attn" / "qkv"), hidden, 3 * hidden),
            out: init::linear(&(p / "attn" / "out"), hidden, hidden),
            norm2: nn::layer_norm(p / "norm2", vec![hidden], Default::default()),
            fc1: init::linear(&(p / "ffn" / "fc1"), hidden, ffn_dim),
            fc2: init::linear(&(p / "ffn" / "fc2"), ffn_dim, hidden),
            n_heads,
            dropout,
        }
    }

    /// `x` `[N, L, H]`; `attend` `[N, 1, 1, L]` bool, true where a key may be attended.
    /// With `compute = Some(kind)` the matmuls and attention run in that precision (bf16
    /// autocast: weights cast on the fly, gradients flow back to the fp32 weights) while
    /// LayerNorms and the residual stream stay fp32.
    pub fn forward(
        &self,
        x: &Tensor,
        attend: &Tensor,
        train: bool,
        compute: Option<Kind>,
    ) -> Tensor {
        let (n, l, h) = x.size3().expect("block input must be [N, L, H]");
        let hd = h / self.n_heads;
        let qkv = linear(&x.apply(&self.norm1), &self.qkv, compute)
            .view([n, l, 3, self.n_heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let a =
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(attend), 0.0, false, None, false);
        let a = linear(&a.transpose(1, 2).reshape([n, l, h]), &self.out, compute)
            .to_kind(x.kind())
            .dropout(self.dropout, train);
        let x = x + a;
        let f = linear(&x.apply(&self.norm2), &self.fc1, compute).gelu("none");
        let f = linear(&f, &self.fc2, compute)
            .to_kind(x.kind())
            .dropout(self.dropout, train);
        x + f
    }
}

/// `x W^T + b`, in `compute` precision when given.
pub fn linear(x: &Tensor, l: &nn::Linear, compute: Option<Kind>) -> Tensor {
    match compute {
        None => x.apply(l),
        Some(k) => x
            .to_kind(k)
            .linear(&l.ws.to_kind(k), l.bs.as_ref().map(|b| b.to_kind(k))),
    }
}
