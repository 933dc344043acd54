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

impl Block {
    /// The block's output for the query positions `idx` `[N, K]` only (keys and values
    /// still come from every token). Equal to `forward(..)` gathered at `idx`, at a
    /// fraction of the cost when `K` is much smaller than `L`: the last block of a
    /// training forward only needs `[CLS]` and the masked tokens.
    pub fn forward_queries(
        &self,
        x: &Tensor,
        attend: &Tensor,
        train: bool,
        compute: Option<Kind>,
        idx: &Tensor,
    ) -> Tensor {
        let (n, l, h) = x.size3().expect("block input must be [N, L, H]");
        let k = idx.size()[1];
        let hd = h / self.n_heads;
        let gather = |t: &Tensor| t.gather(1, &idx.unsqueeze(-1).expand([n, k, h], false), false);
        let hn = x.apply(&self.norm1);
        let (w, b) = (&self.qkv.ws, self.qkv.bs.as_ref().expect("qkv has a bias"));
        let q = linear_w(
            &gather(&hn),
            &w.narrow(0, 0, h),
            Some(&b.narrow(0, 0, h)),
            compute,
        )
        .view([n, k, self.n_heads, hd])
        .transpose(1, 2);
        let kv = linear_w(
            &hn,
            &w.narrow(0, h, 2 * h),
            Some(&b.narrow(0, h, 2 * h)),
            compute,
        )
        .view([n, l, 2, self.n_heads, hd])
        .permute([2, 0, 3, 1, 4]);
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &kv.get(0),
            &kv.get(1),
            Some(attend),
            0.0,
            false,
            None,
            false,
        );
        let a = linear(&a.transpose(1, 2).reshape([n, k, h]), &self.out, compute)
            .to_kind(x.kind())
            .dropout(self.dropout, train);
        let xs = gather(x) + a;
        let f = linear(&xs.apply(&self.norm2), &self.fc1, compute).gelu("none");
        let f = linear(&f, &self.fc2, compute)
            .to_kind(xs.kind())
            .dropout(self.dropout, train);
        xs + f
    }
}

/// `x W^T + b`, in `compute` precision when given.
pub fn linear(x: &Tensor, l: &nn::Linear, compute: Option<Kind>) -> Tensor {
    linear_w(x, &l.ws, l.bs.as_ref(), compute)
}

/// `x W^T + b` with explicit weights, in `compute` precision when given.
pub fn linear_w(x: &Tensor, w: &Tensor, b: Option<&Tensor>, compute: Option<Kind>) -> Tensor {
    match compute {
        None => x.linear(w, b),
        Some(k) => x.to_kind(k).linear(&w.to_kind(k), b.map(|b| b.to_kind(k))),
    }
}
