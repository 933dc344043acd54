//! Parameter initialisation (BERT-style: N(0, 0.02) weights, zero biases).

use tch::nn;

/// N(0, 0.02).
pub fn normal() -> nn::Init {
    nn::Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    }
}

/// A linear layer `[out, in]` weight + `[out]` bias, named `weight`/`bias` like PyTorch.
pub fn linear(p: &nn::Path, input: i64, output: i64) -> nn::Linear {
    linear_init(p, input, output, normal())
}

/// A linear layer with N(0, 1 / input) weights and zero biases: it keeps the scale of
/// inputs whose entries have unit variance (the cell-embedding bottleneck: at N(0, 0.02) it
/// and the GEPC decoder behind it form a deep linear network from small weights, which
/// learns its directions one at a time; a 16-wide bottleneck used 8 of them after 700
/// steps of `minimal`).
pub fn linear_unit(p: &nn::Path, input: i64, output: i64) -> nn::Linear {
    let stdev = 1.0 / (input as f64).sqrt();
    linear_init(p, input, output, nn::Init::Randn { mean: 0.0, stdev })
}

/// A biased linear layer with weights from `weights` and zero biases.
fn linear_init(p: &nn::Path, input: i64, output: i64, weights: nn::Init) -> nn::Linear {
    nn::linear(
        p,
        input,
        output,
        nn::LinearConfig {
            ws_init: weights,
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    )
}
