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
    nn::linear(
        p,
        input,
        output,
        nn::LinearConfig {
            ws_init: normal(),
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    )
}
