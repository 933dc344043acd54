//! All trainable parameters and their gradients as views into two flat fp32 buffers.
//!
//! Every parameter tensor is re-pointed (`set_`) at a slice of one contiguous buffer, and
//! after [`FlatParams::attach_grads`] every gradient at a slice of a second one. Autograd
//! then accumulates straight into the flat gradient, which the optimizer, the gradient
//! clipping, the all-reduce and checksums use as one tensor — no per-step gather/scatter.
//! Parameters that get weight decay come first, so decay applies to one prefix.

use tch::{Device, Kind, Tensor, nn};

/// One parameter's place in the flat buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// PyTorch-style name (`encoder.layers.0.attn.qkv.weight`).
    pub name: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Offset in elements.
    pub offset: i64,
    /// Number of elements.
    pub numel: i64,
}

/// The flat parameter and gradient buffers.
#[derive(Debug)]
pub struct FlatParams {
    /// Parameters in layout order.
    pub slots: Vec<Slot>,
    /// All parameters, contiguous fp32.
    pub flat: Tensor,
    /// All gradients, contiguous fp32 (valid after [`FlatParams::attach_grads`]).
    pub grad: Tensor,
    /// Elements `[0, n_decay)` receive weight decay.
    pub n_decay: i64,
    vars: Vec<Tensor>,
}

/// Whether AdamW's weight decay applies: not to biases, LayerNorms, embeddings.
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias")
        || name.contains("norm")
        || name.starts_with("embed.")
        || name.ends_with(".mask"))
}

impl FlatParams {
    /// Moves every trainable variable of `vs` into the flat buffer.
    pub fn new(vs: &nn::VarStore) -> Self {
        let vars = vs.variables();
        let mut names: Vec<&String> = vars.keys().filter(|n| vars[*n].requires_grad()).collect();
        names.sort_by_key(|n| (!decays(n), (*n).clone()));
        let device = vs.device();
        let total: i64 = names.iter().map(|n| vars[*n].numel() as i64).sum();
        let flat = Tensor::zeros([total], (Kind::Float, device));
        let grad = Tensor::zeros([total], (Kind::Float, device));
        let mut slots = Vec::with_capacity(names.len());
        let mut tensors = Vec::with_capacity(names.len());
        let mut offset = 0i64;
        let mut n_decay = 0i64;
        tch::no_grad(|| {
            for name in &names {
                let mut v = vars[*name].shallow_clone();
                let shape = v.size();
                let numel = v.numel() as i64;
                flat.narrow(0, offset, numel).copy_(&v.reshape([-1]));
                let stride = contiguous_strides(&shape);
                let _ = v.set_source_tensor_storage_offset_(
                    &flat,
                    offset,
                    shape.as_slice(),
                    stride.as_slice(),
                );
                if decays(name) {
                    n_decay += numel;
                }
                slots.push(Slot {
                    name: (*name).clone(),
                    shape,
                    offset,
                    numel,
                });
                tensors.push(v);
                offset += numel;
            }
        });
        FlatParams {
            slots,
            flat,
            grad,
            n_decay,
            vars: tensors,
        }
    }

    /// Number of parameters.
    pub fn numel(&self) -> i64 {
        self.flat.numel() as i64
    }

    /// Device of the buffers.
    pub fn device(&self) -> Device {
        self.flat.device()
    }

    /// Makes every parameter's `.grad` a view into [`FlatParams::grad`]. Runs one
    /// zero-valued backward pass to materialise the gradients first.
    pub fn attach_grads(&mut self) {
        let s = self
            .vars
            .iter()
            .map(|v| v.sum(Kind::Float))
            .fold(Tensor::zeros([], (Kind::Float, self.device())), |a, b| {
                a + b
            });
        (s * 0.0).backward();
        tch::no_grad(|| {
            for (v, slot) in self.vars.iter().zip(&self.slots) {
                let mut g = v.grad();
                let stride = contiguous_strides(&slot.shape);
                let _ = g.set_source_tensor_storage_offset_(
                    &self.grad,
                    slot.offset,
                    slot.shape.as_slice(),
                    stride.as_slice(),
                );
            }
            let _ = self.grad.zero_();
        });
    }

    /// Zeroes the flat gradient in place (gradients stay attached).
    pub fn zero_grad(&self) {
        tch::no_grad(|| {
            let _ = self.grad.shallow_clone().zero_();
        });
    }

    /// Checks that every parameter and gradient still aliases the flat buffers.
    pub fn check_aliasing(&self) -> bool {
        let base = self.flat.data_ptr() as usize;
        let gbase = self.grad.data_ptr() as usize;
        self.vars.iter().zip(&self.slots).all(|(v, s)| {
            let g = v.grad();
            v.data_ptr() as usize == base + 4 * s.offset as usize
                && g.defined()
                && g.data_ptr() as usize == gbase + 4 * s.offset as usize
        })
    }

    /// The flat buffer as a `Vec<f32>` (copy).
    pub fn to_vec(&self) -> Vec<f32> {
        let t = self.flat.to_device(Device::Cpu);
        Vec::<f32>::try_from(&t).expect("flat params are fp32")
    }

    /// Overwrites the parameters from a flat `Vec<f32>` of the same layout.
    pub fn load_vec(&self, values: &[f32]) {
        assert_eq!(values.len() as i64, self.numel(), "flat parameter size");
        tch::no_grad(|| {
            let src = Tensor::from_slice(values).to_device(self.device());
            self.flat.shallow_clone().copy_(&src);
        });
    }

    /// The element ranges `[start, end)` of the parameters whose name satisfies `keep`,
    /// adjacent ones merged.
    pub fn ranges_where(&self, keep: impl Fn(&str) -> bool) -> Vec<(i64, i64)> {
        let mut out: Vec<(i64, i64)> = Vec::new();
        for s in self.slots.iter().filter(|s| keep(&s.name)) {
            match out.last_mut() {
                Some(last) if last.1 == s.offset => last.1 += s.numel,
                _ => out.push((s.offset, s.offset + s.numel)),
            }
        }
        out
    }

    /// A parameter's current values by slot.
    pub fn view(&self, slot: &Slot) -> Tensor {
        self.flat
            .narrow(0, slot.offset, slot.numel)
            .view(slot.shape.as_slice())
    }
}

/// Row-major strides of `shape`.
pub fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut s = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}
