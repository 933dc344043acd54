//! The backward pass in stages, so that each stage's gradients can be all-reduced while
//! the stages below it are still being differentiated (as PyTorch DDP's gradient buckets
//! are).
//!
//! A training forward with cuts ([`super::ScfmModel::forward_train_cut`]) detaches the
//! residual stream after the embeddings and after every encoder block, and continues from
//! a fresh leaf. [`backward_staged`] then differentiates the loss down to the topmost cut
//! (stage 0: the heads and the final LayerNorm), and each cut in turn from the gradient
//! its leaf received (stage 1: the last block, …, stage `n_layers + 1`: the embeddings). The gradients are the same as one backward pass: each
//! stage runs the same operations on the same values, and a parameter used in two stages
//! (the gene table: embeddings and GEPC decoder) receives its two contributions in one
//! addition either way.

use tch::{Kind, Tensor};

/// One cut of the residual stream: the tensor the forward produced and the leaf the rest
/// of the forward used instead.
#[derive(Debug)]
pub struct Cut {
    live: Tensor,
    leaf: Tensor,
}

/// The cuts of one forward, bottom (after the embeddings) first: one level per place the
/// residual stream is cut, each with one cut per group of rows the encoder ran
/// ([`super::groups`]; one when it ran the batch whole).
#[derive(Debug, Default)]
pub struct Cuts(Vec<Vec<Cut>>);

impl Cuts {
    /// No cuts yet.
    pub fn new() -> Self {
        Cuts(Vec::new())
    }

    /// Number of levels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The cuts of forwards over groups of rows of one batch, level by level (every group
    /// ran the same layers, so each has the same levels).
    pub fn merge(groups: Vec<Cuts>) -> Cuts {
        let levels = groups.iter().map(Cuts::len).max().unwrap_or(0);
        let mut merged: Vec<Vec<Cut>> = (0..levels).map(|_| Vec::new()).collect();
        for g in groups {
            for (level, cuts) in g.0.into_iter().enumerate() {
                merged[level].extend(cuts);
            }
        }
        Cuts(merged)
    }
}

/// Cuts `h` when `cuts` is given: records it and returns a detached leaf that requires a
/// gradient; else returns `h` unchanged.
pub(crate) fn cut(h: Tensor, cuts: &mut Option<&mut Cuts>) -> Tensor {
    match cuts {
        Some(c) => {
            let leaf = h.detach().set_requires_grad(true);
            c.0.push(vec![Cut {
                live: h,
                leaf: leaf.shallow_clone(),
            }]);
            leaf
        }
        None => h,
    }
}

/// Differentiates `loss` stage by stage (see the module docs), calling `done(stage)` once
/// the gradients of each stage's parameters are final: stage 0 first, `cuts.len()` last.
pub fn backward_staged(loss: &Tensor, cuts: Cuts, mut done: impl FnMut(usize)) {
    loss.backward();
    done(0);
    for (i, level) in cuts.0.into_iter().rev().enumerate() {
        // d/d(live) of sum(live * g) is exactly g (1 * g, elementwise); the groups' terms
        // of a level go back in one pass.
        let terms: Vec<Tensor> = level
            .into_iter()
            .filter_map(|c| {
                let g = c.leaf.grad();
                g.defined().then(|| (c.live * g).sum(Kind::Float))
            })
            .collect();
        if let Some(first) = terms.first() {
            terms[1..]
                .iter()
                .fold(first.shallow_clone(), |acc, t| acc + t)
                .backward();
        }
        done(i + 1);
    }
}

/// The backward stage whose pass makes a parameter's gradient final, for a model of
/// `n_layers` blocks: 0 for the heads and the final LayerNorm, `n_layers - i` for block
/// `i`, `n_layers + 1` for the embeddings (which the GEPC decoder shares, so they are
/// final only at the very end).
pub fn stage_of(name: &str, n_layers: usize) -> usize {
    if name.starts_with("embed.") {
        return n_layers + 1;
    }
    let block = name
        .strip_prefix("encoder.layers.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse::<usize>().ok());
    match block {
        Some(i) if i < n_layers => n_layers - i,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_follow_the_backward_order() {
        assert_eq!(stage_of("mgem.fc.weight", 4), 0);
        assert_eq!(stage_of("encoder.norm.weight", 4), 0);
        assert_eq!(stage_of("gepc.bias", 4), 0);
        assert_eq!(stage_of("encoder.layers.3.attn.qkv.weight", 4), 1);
        assert_eq!(stage_of("encoder.layers.2.fc1.bias", 4), 2);
        assert_eq!(stage_of("encoder.layers.0.norm1.weight", 4), 4);
        assert_eq!(stage_of("embed.genes.weight", 4), 5);
        assert_eq!(stage_of("encoder.layers.11.fc1.weight", 12), 1);
        assert_eq!(stage_of("encoder.layers.1.fc1.weight", 12), 11);
    }
}
