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
    /// Element ranges `[start, end)` of the flat buffer whose learning rate is `lr` times
    /// a factor (sorted, disjoint); the rest of the buffer trains at `lr`.
    lr_scales: Vec<(usize, usize, f64)>,
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
            lr_scales: Vec::new(),
            exp_avg: Tensor::zeros([n], opts),
            exp_avg_sq: Tensor::zeros([n], opts),
            step: 0,
        }
    }

    /// Trains the element ranges `[start, end)` of the flat buffer at `lr × scale` (a
    /// parameter group, as PyTorch's optimizers take them): weight decay and the step
    /// scale alike, as a group of their own learning rate would. Replaces earlier scales.
    pub fn set_lr_scale(&mut self, ranges: &[(i64, i64)], scale: f64) {
        let mut r: Vec<(usize, usize, f64)> = ranges
            .iter()
            .filter(|(a, b)| b > a)
            .map(|&(a, b)| (a as usize, b as usize, scale))
            .collect();
        r.sort_by_key(|x| x.0);
        assert!(
            r.windows(2).all(|w| w[0].1 <= w[1].0),
            "learning-rate ranges overlap"
        );
        self.lr_scales = if scale == 1.0 { Vec::new() } else { r };
    }

    /// The buffer `[0, n)` cut into segments of one learning-rate factor each.
    fn segments(&self, n: usize) -> Vec<(usize, usize, f64)> {
        let mut out = Vec::with_capacity(2 * self.lr_scales.len() + 1);
        let mut at = 0;
        for &(a, b, f) in &self.lr_scales {
            let (a, b) = (a.min(n), b.min(n));
            if a > at {
                out.push((at, a, 1.0));
            }
            if b > a {
                out.push((a, b, f));
            }
            at = at.max(b);
        }
        if at < n {
            out.push((at, n, 1.0));
        }
        out
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
        for (a, b, f) in self.segments(n) {
            let lr = lr * f;
            let k = Kernel {
                b1: self.cfg.beta1 as f32,
                b2: self.cfg.beta2 as f32,
                eps: self.cfg.eps as f32,
                decay: (1.0 - lr * self.cfg.weight_decay) as f32,
                step_size: (lr / bc1) as f32,
                bc2_sqrt: bc2.sqrt() as f32,
            };
            let (p, g, m, v) = (&mut p[a..b], &g[a..b], &mut m[a..b], &mut v[a..b]);
            k.run_threaded(p, g, m, v, n_decay.saturating_sub(a));
        }
    }

    fn update_tensor(&mut self, params: &FlatParams, lr: f64, bc1: f64, bc2: f64) {
        let c = self.cfg;
        let n_decay = params.n_decay as usize;
        let segments = self.segments(params.numel() as usize);
        tch::no_grad(|| {
            let g = &params.grad;
            let _ = self
                .exp_avg
                .g_mul_scalar_(c.beta1)
                .g_add_(&(g * (1.0 - c.beta1)));
            let _ = self
                .exp_avg_sq
                .g_mul_scalar_(c.beta2)
                .g_add_(&(g * g * (1.0 - c.beta2)));
            for (a, b, f) in segments {
                let lr = lr * f;
                let len = (b - a) as i64;
                let p = params.flat.narrow(0, a as i64, len);
                let decayed = n_decay.clamp(a, b) - a;
                if c.weight_decay > 0.0 && decayed > 0 {
                    let _ = p
                        .narrow(0, 0, decayed as i64)
                        .g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let m = self.exp_avg.narrow(0, a as i64, len);
                let denom = self.exp_avg_sq.narrow(0, a as i64, len).sqrt() / bc2.sqrt() + c.eps;
                let _ = p.shallow_clone().g_sub_(&(m / denom * (lr / bc1)));
            }
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
    /// Updates a segment split across the intra-op threads; its first `n_decay` elements
    /// get weight decay.
    fn run_threaded(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], n_decay: usize) {
        let n = p.len();
        if n == 0 {
            return;
        }
        let threads = (tch::get_num_threads().max(1) as usize).min(n / 65_536 + 1);
        let chunk = n.div_ceil(threads);
        let k = *self;
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

    const TEST_CFG: AdamWConfig = AdamWConfig {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };

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
            let mut opt = AdamW::new(TEST_CFG, &p);
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

    /// A range trained at `lr × 3` gets exactly the update of a whole-buffer step at
    /// `lr × 3`, the rest that of `lr`, on both paths; scale 1 changes nothing.
    #[test]
    fn a_scaled_range_trains_at_its_own_learning_rate() {
        let run = |lr: f64, scaled: Option<f64>, tensor_path: bool| {
            let vs = nn::VarStore::new(Device::Cpu);
            let root = vs.root();
            let _a = (&root / "a").var("weight", &[3], nn::Init::Const(1.0));
            let _d = (&root / "gepc").var("weight", &[4], nn::Init::Const(-0.5));
            let _b = (&root / "gepc").var("bias", &[2], nn::Init::Const(0.25));
            let _c = (&root / "z").var("bias", &[2], nn::Init::Const(2.0));
            let mut p = FlatParams::new(&vs);
            p.attach_grads();
            let mut opt = AdamW::new(TEST_CFG, &p);
            if let Some(f) = scaled {
                opt.set_lr_scale(&p.ranges_where(|n| n.starts_with("gepc.")), f);
            }
            for step in 1..=3 {
                let g: Vec<f32> = (0..11).map(|i| ((i * 7 + step) % 5) as f32 - 2.0).collect();
                p.grad.shallow_clone().copy_(&Tensor::from_slice(&g));
                if tensor_path {
                    opt.step += 1;
                    let t = opt.step as i32;
                    opt.update_tensor(&p, lr, 1.0 - 0.9f64.powi(t), 1.0 - 0.99f64.powi(t));
                } else {
                    opt.update(&p, lr);
                }
            }
            let names: Vec<&str> = p.slots.iter().map(|s| s.name.as_str()).collect();
            (
                p.to_vec(),
                p.ranges_where(|n| n.starts_with("gepc.")),
                names.join(","),
            )
        };
        for tensor_path in [false, true] {
            let (base, ranges, names) = run(0.01, None, tensor_path);
            // Decayed weights first (a, gepc.weight), then the biases (gepc.bias, z).
            assert_eq!(names, "a.weight,gepc.weight,gepc.bias,z.bias");
            assert_eq!(ranges, vec![(3, 9)], "adjacent slots merge");
            assert_eq!(run(0.01, Some(1.0), tensor_path).0, base);
            let (scaled, _, _) = run(0.01, Some(3.0), tensor_path);
            let (fast, _, _) = run(0.03, None, tensor_path);
            for i in 0..11 {
                let want = if (3..9).contains(&i) {
                    fast[i]
                } else {
                    base[i]
                };
                assert_eq!(scaled[i], want, "element {i} (tensor path {tensor_path})");
            }
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
