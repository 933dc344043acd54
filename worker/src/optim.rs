//! AdamW whose state the project owns, applied to the flat parameter buffer.
//!
//! The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias-corrected
//! moments). On CPU it runs as one fused pass over the flat buffers in Rust, split across
//! threads; on other devices as tensor operations.

use tch::{Device, Kind, Tensor};

use crate::params::FlatParams;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// Optimizer state: first and second moments (flat, fp32) and the step count.
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// First moments.
    pub exp_avg: Tensor,
    /// Second moments.
    pub exp_avg_sq: Tensor,
    /// Number of updates applied.
    pub step: u64,
}

impl AdamW {
    /// Zero state for `params`.
    pub fn new(cfg: AdamWConfig, params: &FlatParams) -> Self {
        let n = params.numel();
        let opts = (Kind::Float, params.device());
        AdamW {
            cfg,
            exp_avg: Tensor::zeros([n], opts),
            exp_avg_sq: Tensor::zeros([n], opts),
            step: 0,
        }
    }

    /// One update with learning rate `lr` from the gradient in `params.grad`.
    pub fn update(&mut self, params: &FlatParams, lr: f64) {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        if params.device() == Device::Cpu {
            self.update_cpu(params, lr, bc1, bc2);
        } else {
            self.update_tensor(params, lr, bc1, bc2);
        }
    }

    fn update_cpu(&mut self, params: &FlatParams, lr: f64, bc1: f64, bc2: f64) {
        let n = params.numel() as usize;
        let n_decay = params.n_decay as usize;
        // SAFETY: the four buffers are distinct, contiguous fp32 CPU tensors of `n`
        // elements that nothing else touches during the update.
        let (p, g, m, v) = unsafe {
            (
                std::slice::from_raw_parts_mut(params.flat.data_ptr() as *mut f32, n),
                std::slice::from_raw_parts(params.grad.data_ptr() as *const f32, n),
                std::slice::from_raw_parts_mut(self.exp_avg.data_ptr() as *mut f32, n),
                std::slice::from_raw_parts_mut(self.exp_avg_sq.data_ptr() as *mut f32, n),
            )
        };
        let k = Kernel {
            b1: self.cfg.beta1 as f32,
            b2: self.cfg.beta2 as f32,
            eps: self.cfg.eps as f32,
            decay: (1.0 - lr * self.cfg.weight_decay) as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
        };
        let threads = (tch::get_num_threads().max(1) as usize).min(n / 65_536 + 1);
        let chunk = n.div_ceil(threads);
        std::thread::scope(|s| {
            let parts = p
                .chunks_mut(chunk)
                .zip(g.chunks(chunk))
                .zip(m.chunks_mut(chunk))
                .zip(v.chunks_mut(chunk));
            for (i, (((p, g), m), v)) in parts.enumerate() {
                let start = i * chunk;
                s.spawn(move || k.run(p, g, m, v, n_decay.saturating_sub(start).min(p.len())));
            }
        });
    }

    fn update_tensor(&mut self, params: &FlatParams, lr: f64, bc1: f64, bc2: f64) {
        let c = self.cfg;
        tch::no_grad(|| {
            if c.weight_decay > 0.0 && params.n_decay > 0 {
                let _ = params
                    .flat
                    .narrow(0, 0, params.n_decay)
                    .g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let g = &params.grad;
            let _ = self
                .exp_avg
                .g_mul_scalar_(c.beta1)
                .g_add_(&(g * (1.0 - c.beta1)));
            let _ = self
                .exp_avg_sq
                .g_mul_scalar_(c.beta2)
                .g_add_(&(g * g * (1.0 - c.beta2)));
            let denom = self.exp_avg_sq.sqrt() / bc2.sqrt() + c.eps;
            let _ = params
                .flat
                .shallow_clone()
                .g_sub_(&(&self.exp_avg / denom * (lr / bc1)));
        });
    }
}

#[derive(Debug, Clone, Copy)]
struct Kernel {
    b1: f32,
    b2: f32,
    eps: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
}

impl Kernel {
    /// Updates one chunk; its first `n_decay` elements get weight decay.
    fn run(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], n_decay: usize) {
        let (omb1, omb2) = (1.0 - self.b1, 1.0 - self.b2);
        for i in 0..p.len() {
            let gi = g[i];
            let mi = self.b1 * m[i] + omb1 * gi;
            let vi = self.b2 * v[i] + omb2 * gi * gi;
            m[i] = mi;
            v[i] = vi;
            let mut pi = p[i];
            if i < n_decay {
                pi *= self.decay;
            }
            p[i] = pi - self.step_size * mi / (vi.sqrt() / self.bc2_sqrt + self.eps);
        }
    }
}

/// Scales the flat gradient so its global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(params: &FlatParams, max_norm: Option<f64>) -> f64 {
    let norm = params.grad.norm().double_value(&[]);
    if let Some(max) = max_norm {
        let coef = (max / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            tch::no_grad(|| {
                let _ = params.grad.shallow_clone().g_mul_scalar_(coef);
            });
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn;

    /// One AdamW step on a 1-element decayed and a 1-element non-decayed parameter,
    /// checked against the formula written out by hand.
    #[test]
    fn adamw_step_matches_formula_on_cpu_and_tensor_paths() {
        for use_tensor_path in [false, true] {
            let vs = nn::VarStore::new(Device::Cpu);
            let root = vs.root();
            let _w = (&root / "layer").var("weight", &[1], nn::Init::Const(2.0));
            let _b = (&root / "layer").var("bias", &[1], nn::Init::Const(-1.0));
            let mut p = FlatParams::new(&vs);
            p.attach_grads();
            p.grad
                .shallow_clone()
                .copy_(&Tensor::from_slice(&[0.5f32, -0.25]));
            let cfg = AdamWConfig {
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
                weight_decay: 0.1,
            };
            let mut opt = AdamW::new(cfg, &p);
            if use_tensor_path {
                opt.step += 1;
                opt.update_tensor(&p, 0.1, 1.0 - 0.9, 1.0 - 0.99);
            } else {
                opt.update(&p, 0.1);
            }
            // m = 0.1 g, v = 0.01 g²; m̂ = g, v̂ = g²; update = lr * g / (|g| + eps).
            let got = p.to_vec();
            let w = 2.0 * (1.0 - 0.1 * 0.1) - 0.1 * 0.5 / (0.5 + 1e-8);
            let b = -1.0 - 0.1 * (-0.25) / (0.25 + 1e-8);
            assert!((got[0] as f64 - w).abs() < 1e-6, "{got:?}");
            assert!((got[1] as f64 - b).abs() < 1e-6, "{got:?}");
            assert_eq!(p.slots[0].name, "layer.weight");
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _w = vs.root().var("w", &[2], nn::Init::Const(0.0));
        let mut p = FlatParams::new(&vs);
        p.attach_grads();
        p.grad
            .shallow_clone()
            .copy_(&Tensor::from_slice(&[3f32, 4.0]));
        let n = clip_grad_norm(&p, Some(1.0));
        assert!((n - 5.0).abs() < 1e-6);
        let g = Vec::<f32>::try_from(&p.grad).unwrap();
        assert!(
            (g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5,
            "{g:?}"
        );
        assert!((clip_grad_norm(&p, None) - 1.0).abs() < 1e-5);
    }
}
