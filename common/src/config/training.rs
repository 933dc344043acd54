//! Training settings: optimizer, schedule, batching, augmentations, device.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The peak learning rate of a configuration that no model preset resolved.
pub const DEFAULT_LR: f64 = 1e-3;

/// Learning-rate decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine decay from `lr` to `lr * min_lr_ratio` at the last step.
    Cosine,
    /// Linear decay from `lr` to `lr * min_lr_ratio` at the last step.
    Linear,
    /// Constant `lr` after warmup.
    Constant,
}

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when available, else CPU.
    #[default]
    Auto,
    /// CPU only.
    Cpu,
    /// CUDA; an error when no GPU is usable.
    Cuda,
}

/// Numeric precision of the forward/backward pass (weights and optimizer state stay fp32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 autocast on CUDA, fp32 on CPU.
    #[default]
    Auto,
    /// fp32 everywhere.
    Fp32,
    /// bf16 compute (CUDA only).
    Bf16,
}

/// Data augmentations used to build the two contrastive views of a cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// Probability of dropping each expressed gene from a view.
    pub gene_dropout: f64,
    /// Standard deviation of Gaussian noise added to log1p expression values.
    pub noise_std: f64,
    /// Probability that a view is mixed with another cell of the batch (CellMix).
    pub cellmix_prob: f64,
    /// Weight of the other cell in a CellMix (the view keeps `1 - cellmix_alpha`).
    pub cellmix_alpha: f64,
    /// Library-size augmentation: each view keeps a fraction `p ~ U(1 - downsample, 1)`
    /// of the cell's counts (binomial thinning of every gene's count) and is normalised
    /// again, so the two views of a cell differ in depth and the contrastive loss cannot
    /// use depth to tell cells apart. 0 turns it off; must be in `[0, 1)`; default 0.8.
    /// Needs counts (the depths of the source's cells; cells of unknown depth are left as
    /// they are).
    pub downsample: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            gene_dropout: 0.3,
            noise_std: 0.0,
            cellmix_prob: 0.0,
            cellmix_alpha: 0.2,
            downsample: 0.8,
        }
    }
}

/// Optimisation and loop settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Seed of every random stream (data order, masking, dropout, initialisation).
    pub seed: u64,
    /// Cells per micro-batch on each worker (each cell yields two views).
    pub batch_size: usize,
    /// Micro-batches accumulated before one optimizer step.
    pub grad_accum: usize,
    /// Passes over the training cells.
    pub epochs: usize,
    /// Stop after this many optimizer steps, if set (also bounds the schedule).
    pub max_steps: Option<u64>,
    /// Peak learning rate; absent (`null`): the model preset's ([`crate::config::preset_lr`]:
    /// `minimal` 3e-3, `default` and `large` 1e-3), filled in when the file is resolved.
    pub lr: Option<f64>,
    /// The GEPC decoder's learning rate (its per-gene weights and biases, or its layers) as
    /// a multiple of `lr`, through the same warmup and decay; 1 trains it with the rest.
    pub decoder_lr_scale: f64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Decay after warmup.
    pub schedule: Schedule,
    /// AdamW decoupled weight decay (not applied to biases, LayerNorms and embeddings).
    pub weight_decay: f64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// Clip gradients to this global L2 norm; `null` disables clipping.
    pub clip_grad_norm: Option<f64>,
    /// Evaluate on the validation cells every this many steps (and at each epoch end).
    pub eval_every: u64,
    /// Stop when validation loss has not improved for this many evaluations.
    pub early_stopping_patience: Option<usize>,
    /// Cap on the number of validation cells evaluated.
    pub max_eval_cells: usize,
    /// Log a line every this many steps.
    pub log_every: u64,
    /// Intra-op CPU threads (default: all cores).
    pub threads: Option<usize>,
    /// The encoder runs a batch's rows in up to this many groups of similar length, each
    /// padded to its own longest row instead of the batch's (the same values up to
    /// rounding; used only when it saves at least a tenth of the padded tokens and every
    /// group has 8 rows or more); 1 pads the whole batch to its longest row. Default 4.
    pub length_groups: usize,
    /// Device choice.
    pub device: Device,
    /// Compute precision.
    pub precision: Precision,
    /// Contrastive-view augmentations.
    pub augment: Augment,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            seed: 0,
            batch_size: 32,
            grad_accum: 1,
            epochs: 1,
            max_steps: None,
            lr: None,
            decoder_lr_scale: 1.0,
            min_lr_ratio: 0.1,
            warmup_steps: 100,
            schedule: Schedule::Cosine,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_grad_norm: Some(1.0),
            eval_every: 200,
            early_stopping_patience: None,
            max_eval_cells: 2_000,
            log_every: 10,
            threads: None,
            length_groups: 4,
            device: Device::Auto,
            precision: Precision::Auto,
            augment: Augment::default(),
        }
    }
}

impl TrainingConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let err = |f: &str, m: String| Err(Error::config(format!("training.{f}"), m));
        if !(1..=64).contains(&self.length_groups) {
            return err(
                "length_groups",
                format!("{} must be between 1 and 64", self.length_groups),
            );
        }
        if self.batch_size < 2 {
            return err(
                "batch_size",
                format!(
                    "{} is too small; contrastive learning needs at least 2 cells",
                    self.batch_size
                ),
            );
        }
        if self.grad_accum == 0 {
            return err("grad_accum", "must be >= 1".into());
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return err("epochs", "must be >= 1 (or set max_steps)".into());
        }
        if self.max_steps == Some(0) {
            return err("max_steps", "must be >= 1".into());
        }
        if let Some(lr) = self.lr
            && !(lr > 0.0 && lr.is_finite())
        {
            return err("lr", format!("{lr} must be a positive number"));
        }
        if !(self.decoder_lr_scale > 0.0 && self.decoder_lr_scale.is_finite()) {
            return err(
                "decoder_lr_scale",
                format!("{} must be a positive number", self.decoder_lr_scale),
            );
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return err(
                "min_lr_ratio",
                format!("{} is outside [0, 1]", self.min_lr_ratio),
            );
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return err(
                "weight_decay",
                format!("{} must be >= 0", self.weight_decay),
            );
        }
        for (f, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return err(f, format!("{b} is outside [0, 1)"));
            }
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return err("eps", format!("{} must be > 0", self.eps));
        }
        if let Some(c) = self.clip_grad_norm
            && !(c > 0.0 && c.is_finite())
        {
            return err(
                "clip_grad_norm",
                format!("{c} must be > 0 (or null to disable)"),
            );
        }
        if self.eval_every == 0 {
            return err("eval_every", "must be >= 1".into());
        }
        if self.log_every == 0 {
            return err("log_every", "must be >= 1".into());
        }
        if self.threads == Some(0) {
            return err("threads", "must be >= 1".into());
        }
        let a = &self.augment;
        for (f, p) in [
            ("augment.gene_dropout", a.gene_dropout),
            ("augment.cellmix_prob", a.cellmix_prob),
            ("augment.downsample", a.downsample),
        ] {
            if !(0.0..1.0).contains(&p) {
                return err(f, format!("{p} is outside [0, 1)"));
            }
        }
        if !(0.0..=1.0).contains(&a.cellmix_alpha) {
            return err(
                "augment.cellmix_alpha",
                format!("{} is outside [0, 1]", a.cellmix_alpha),
            );
        }
        if !(a.noise_std >= 0.0 && a.noise_std.is_finite()) {
            return err("augment.noise_std", format!("{} must be >= 0", a.noise_std));
        }
        Ok(())
    }

    /// The peak learning rate: `lr`, or [`DEFAULT_LR`] where no preset filled it in (a
    /// configuration built in code rather than resolved from a file).
    pub fn peak_lr(&self) -> f64 {
        self.lr.unwrap_or(DEFAULT_LR)
    }

    /// Learning rate at optimizer step `step` (0-based) of `total` steps.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        let peak = self.peak_lr();
        if self.warmup_steps > 0 && step < self.warmup_steps {
            return peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let min = peak * self.min_lr_ratio;
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps.min(step)) as f64 / span).clamp(0.0, 1.0);
        match self.schedule {
            Schedule::Constant => peak,
            Schedule::Linear => peak + (min - peak) * t,
            Schedule::Cosine => min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * t).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_shapes() {
        assert_eq!(TrainingConfig::default().peak_lr(), DEFAULT_LR);
        let c = TrainingConfig {
            lr: Some(1.0),
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert!((c.lr_at(0, 110) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(9, 110) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(10, 110) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(60, 110) - 0.55).abs() < 1e-12); // cosine midpoint
        assert!((c.lr_at(110, 110) - 0.1).abs() < 1e-12);
        let l = TrainingConfig {
            schedule: Schedule::Linear,
            ..c.clone()
        };
        assert!((l.lr_at(35, 110) - 0.775).abs() < 1e-12);
        let k = TrainingConfig {
            schedule: Schedule::Constant,
            ..c
        };
        assert_eq!(k.lr_at(100, 110), 1.0);
    }

    #[test]
    fn invalid_training_settings_are_named() {
        let base = TrainingConfig::default();
        let cases: Vec<(TrainingConfig, &str)> = vec![
            (
                TrainingConfig {
                    batch_size: 1,
                    ..base.clone()
                },
                "invalid config `training.batch_size`: 1 is too small; contrastive learning needs at least 2 cells",
            ),
            (
                TrainingConfig {
                    grad_accum: 0,
                    ..base.clone()
                },
                "invalid config `training.grad_accum`: must be >= 1",
            ),
            (
                TrainingConfig {
                    lr: Some(-1.0),
                    ..base.clone()
                },
                "invalid config `training.lr`: -1 must be a positive number",
            ),
            (
                TrainingConfig {
                    decoder_lr_scale: 0.0,
                    ..base.clone()
                },
                "invalid config `training.decoder_lr_scale`: 0 must be a positive number",
            ),
            (
                TrainingConfig {
                    beta2: 1.0,
                    ..base.clone()
                },
                "invalid config `training.beta2`: 1 is outside [0, 1)",
            ),
            (
                TrainingConfig {
                    clip_grad_norm: Some(0.0),
                    ..base.clone()
                },
                "invalid config `training.clip_grad_norm`: 0 must be > 0 (or null to disable)",
            ),
            (
                TrainingConfig {
                    max_steps: Some(0),
                    ..base.clone()
                },
                "invalid config `training.max_steps`: must be >= 1",
            ),
            (
                TrainingConfig {
                    augment: Augment {
                        gene_dropout: 1.0,
                        ..Default::default()
                    },
                    ..base.clone()
                },
                "invalid config `training.augment.gene_dropout`: 1 is outside [0, 1)",
            ),
            (
                TrainingConfig {
                    length_groups: 0,
                    ..base.clone()
                },
                "invalid config `training.length_groups`: 0 must be between 1 and 64",
            ),
            (
                TrainingConfig {
                    length_groups: 65,
                    ..base.clone()
                },
                "invalid config `training.length_groups`: 65 must be between 1 and 64",
            ),
        ];
        for (c, msg) in cases {
            assert_eq!(c.validate().unwrap_err().to_string(), msg);
        }
        base.validate().unwrap();
    }
}
