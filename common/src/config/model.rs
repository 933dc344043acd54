//! Model configuration, presets and validation.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a token's expression value enters the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpressionEncoding {
    /// Per-cell quantile bins of log1p-normalised values (bin 0 = zero), embedded by
    /// a table with one extra row for the MASK bin; MGEM is a cross-entropy over bins.
    Binned,
    /// The log1p-normalised value through a small MLP; masked values are replaced by a
    /// learned vector; MGEM is a mean squared error.
    Continuous,
}

/// Which genes a training view keeps when a cell expresses more than `max_seq_len - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Subsample {
    /// A uniform random sample of the expressed genes (the default of configs written
    /// before this setting existed). In deep cells most of the sample is genes seen once,
    /// while inference keeps the top-expressed genes: training and inference then see
    /// different tokens.
    #[default]
    Random,
    /// The top-expressed genes of the view (after gene dropout and noise; equal values in
    /// a random order per view), as inference keeps them.
    Top,
}

/// Positional encoding added to the token embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positional {
    /// None: a cell's genes are a set (default).
    None,
    /// Fixed sinusoidal encoding (Vaswani et al.).
    Sinusoidal,
    /// A learned table of `max_seq_len` vectors.
    Learned,
}

/// How the cell embedding is pooled from the encoder output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The `[CLS]` token's output.
    Cls,
    /// The mean over the expressed-gene tokens (padding and `[CLS]` excluded).
    Mean,
}

/// What the GEPC decoder predicts for each vocabulary gene of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GepcTarget {
    /// The log1p-normalised expression itself: its squared error is dominated by the
    /// highly expressed genes.
    #[default]
    Log1p,
    /// The log1p-normalised expression standardised per gene, `(x - mean) / std` clipped
    /// to ±10, with the genes' mean and standard deviation measured on a sample of the
    /// training cells at start: every gene counts alike, as in scanpy's `scale` before PCA,
    /// so the cell embedding must carry the rare cell types' marker genes too.
    Scaled,
}

/// Which genes of a cell the GEPC decoder's loss covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GepcGenes {
    /// Every vocabulary gene (the decoder reconstructs the whole profile).
    #[default]
    All,
    /// Only the genes the view does not show unmasked: masked, dropped by augmentation or
    /// by the sequence limit, and not expressed. The cell embedding must then predict
    /// what it did not see (scGPT's MVC predicts the masked genes the same way), not
    /// repeat its input.
    Unseen,
}

impl GepcGenes {
    fn is_all(&self) -> bool {
        *self == GepcGenes::All
    }
}

/// How the GEPC decoder maps a cell embedding to each gene's expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GepcDecoder {
    /// scGPT's MVC: `⟨W c, σ(V e_g)⟩ + b_g`, a query per gene from its token embedding.
    #[default]
    GeneQuery,
    /// A linear map with its own weights per gene: `w_g · c + b_g` (an autoencoder's
    /// linear decoder, as PCA reconstructs from its components).
    PerGene,
}

impl GepcDecoder {
    fn is_gene_query(&self) -> bool {
        *self == GepcDecoder::GeneQuery
    }
}

/// What `scfm embed` and `scfm evaluate` give as a cell's embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CellEmbedding {
    /// The pooled encoder output (through the `latent_dim` map when set), as it is.
    #[default]
    Pooled,
    /// The pooled embedding `c` in the GEPC decoder's metric: `c S` with `S = (MᵀM / G)^½`
    /// (the symmetric square root), where `M` `[G, C]` is the decoder's linear map of `c`
    /// onto the `G` vocabulary genes (its per-gene biases and the genes-detected term left
    /// out). The Euclidean distance of two such embeddings is the root-mean-square
    /// difference of the two cells' decoded profiles, so each direction of `c` counts by
    /// how much expression it decodes to, as PCA's scores count by the variance they carry;
    /// the pooled vector itself weighs its directions by whatever scale training left them
    /// at (the decoder can undo any linear map of `c`). A model without the decoder
    /// (`w_gepc: 0`) gives the pooled vector ([`ModelConfig::read_out`]).
    DecoderMetric,
}

impl CellEmbedding {
    fn is_pooled(&self) -> bool {
        *self == CellEmbedding::Pooled
    }

    /// `pooled` or `decoder_metric`, as configuration files spell it.
    pub fn name(&self) -> &'static str {
        match self {
            CellEmbedding::Pooled => "pooled",
            CellEmbedding::DecoderMetric => "decoder_metric",
        }
    }
}

/// The model architecture and its loss settings. See `configs/models/*.yaml` for the
/// presets and a comment on every field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model width.
    pub hidden: usize,
    /// Number of encoder blocks.
    pub n_layers: usize,
    /// Attention heads per block; must divide `hidden`.
    pub n_heads: usize,
    /// Feed-forward inner size.
    pub ffn_dim: usize,
    /// Maximum tokens per cell including `[CLS]`.
    pub max_seq_len: usize,
    /// Which genes a training view keeps when the cell has more than fit.
    #[serde(default)]
    pub subsample: Subsample,
    /// Dropout probability (embeddings, attention output, feed-forward output).
    pub dropout: f64,
    /// Expression encoding.
    pub expression: ExpressionEncoding,
    /// Number of expression bins including bin 0 (binned encoding).
    pub n_bins: usize,
    /// Positional encoding.
    pub positional: Positional,
    /// Fraction of gene tokens whose expression is masked.
    pub mask_ratio: f64,
    /// Label smoothing of the MGEM cross-entropy.
    pub label_smoothing: f64,
    /// Output size of the contrastive projection head.
    pub projection_dim: usize,
    /// NT-Xent temperature.
    pub temperature: f64,
    /// Weight of the MGEM loss.
    pub w_mgem: f64,
    /// Weight of the contrastive loss.
    pub w_contrastive: f64,
    /// Weight of the cell-embedding expression decoder (GEPC, as scGPT's MVC): every
    /// vocabulary gene's log1p-normalised expression is predicted from the cell embedding
    /// and the gene's embedding alone, so the cell embedding must carry the cell's profile.
    /// 0 leaves the decoder out of the model.
    #[serde(default)]
    pub w_gepc: f64,
    /// What the GEPC decoder predicts (absent in older configurations: `log1p`).
    #[serde(default)]
    pub gepc_target: GepcTarget,
    /// With `gepc_target: scaled`, the standardised targets are clipped to `±gepc_clip`
    /// (absent: [`DEFAULT_GEPC_CLIP`], scanpy's `scale(max_value=10)`). A gene expressed in
    /// a fraction `p` of the cells reaches `z ≈ sqrt((1 − p) / p)` there (about 14 for ten
    /// cells of 1,886), so a higher clip keeps rare types' markers whole. `null` reads as
    /// no clip (`f64::MAX`): the version that accepted `.inf` wrote that into checkpoints.
    #[serde(
        default = "default_gepc_clip",
        deserialize_with = "clip_or_null",
        skip_serializing_if = "is_default_gepc_clip"
    )]
    pub gepc_clip: f64,
    /// Whether the GEPC decoder also sees how many genes the target cell expresses
    /// (`ln(1 + genes detected)`, one learned slope per gene): which genes are zero in a
    /// profile depends on the cell's sequencing depth, and with this covariate the cell
    /// embedding need not carry depth to predict them (scVI conditions its decoder on
    /// library size the same way). Off (absent) by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gepc_detected: bool,
    /// Which genes the GEPC loss covers (absent: `all`).
    #[serde(default, skip_serializing_if = "GepcGenes::is_all")]
    pub gepc_genes: GepcGenes,
    /// The GEPC decoder's form (absent: `gene_query`).
    #[serde(default, skip_serializing_if = "GepcDecoder::is_gene_query")]
    pub gepc_decoder: GepcDecoder,
    /// Cell-embedding pooling.
    pub pooling: Pooling,
    /// The cell embedding's size when it is a linear map of the pooled encoder output
    /// (a bottleneck, as a VAE's latent), which the contrastive head and the GEPC decoder
    /// read; absent: the pooled output itself (`hidden` wide).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent_dim: Option<usize>,
    /// What `scfm embed` and `scfm evaluate` give as the cell embedding (absent: `pooled`);
    /// a read-out of the trained model that training does not use.
    #[serde(default, skip_serializing_if = "CellEmbedding::is_pooled")]
    pub embedding: CellEmbedding,
    /// With `embedding: decoder_metric`, how far the read-out's metric goes from the pooled
    /// vector's own (0) to the decoder's (1, absent): the read-out is `c A^(w/2)` with
    /// `A = MᵀM / G`, so its metric tensor is `A^w`, the matrix geometric path from the
    /// identity to `A`; 0.5 is the geometric mean of the two metrics (the pooled vector's,
    /// which the contrastive loss shapes, and the decoded profiles'). Within `[0, 1]`.
    #[serde(
        default = "default_metric_weight",
        skip_serializing_if = "is_default_metric_weight"
    )]
    pub metric_weight: f64,
}

/// `model.metric_weight` when absent: the decoder's metric itself.
pub const DEFAULT_METRIC_WEIGHT: f64 = 1.0;

fn default_metric_weight() -> f64 {
    DEFAULT_METRIC_WEIGHT
}

fn is_default_metric_weight(w: &f64) -> bool {
    *w == DEFAULT_METRIC_WEIGHT
}

/// The clip of standardised GEPC targets when `model.gepc_clip` is absent.
pub const DEFAULT_GEPC_CLIP: f64 = 10.0;

fn default_gepc_clip() -> f64 {
    DEFAULT_GEPC_CLIP
}

fn is_default_gepc_clip(c: &f64) -> bool {
    *c == DEFAULT_GEPC_CLIP
}

/// A clip, or `null` as no clip: JSON has no infinity, and a checkpoint written while
/// `gepc_clip: .inf` was accepted holds `null` there. `f64::MAX` clips nothing and stays
/// finite, so such a checkpoint loads, validates and computes as it trained.
fn clip_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(<Option<f64> as serde::Deserialize>::deserialize(d)?.unwrap_or(f64::MAX))
}

/// Names of the built-in presets, in size order.
pub const PRESETS: [&str; 3] = ["minimal", "default", "large"];

fn preset_yaml(name: &str) -> Option<&'static str> {
    match name {
        "minimal" => Some(include_str!("../../../configs/models/minimal.yaml")),
        "default" => Some(include_str!("../../../configs/models/default.yaml")),
        "large" => Some(include_str!("../../../configs/models/large.yaml")),
        _ => None,
    }
}

/// The peak learning rate a preset trains with when `training.lr` is not set.
///
/// `minimal` fits its GEPC decoder at 3e-3: at 1e-3 the decoder was underfitted after
/// 700 steps and rare cell types sat near the centre of the embedding (pbmc68k and Baron
/// pancreas, three seeds each, in BENCHMARKS.md). The larger presets keep 1e-3, the usual
/// rate for transformers of their size.
pub fn preset_lr(name: &str) -> Option<f64> {
    match name {
        "minimal" => Some(3e-3),
        "default" | "large" => Some(1e-3),
        _ => None,
    }
}

/// The preset a `model:` section names (`minimal` when it names none).
pub fn spec_preset(spec: &serde_norway::Value) -> Result<String> {
    let named = match spec {
        serde_norway::Value::Mapping(m) => m.get("preset"),
        _ => None,
    };
    match named {
        None => Ok("minimal".to_string()),
        Some(serde_norway::Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(Error::config(
            "model.preset",
            format!("expected a preset name, found {v:?}"),
        )),
    }
}

/// Token ids reserved before the gene tokens.
pub mod special {
    /// Padding token id.
    pub const PAD: i64 = 0;
    /// `[CLS]` token id.
    pub const CLS: i64 = 1;
    /// Number of reserved ids; gene `g` (0-based column) has token id `g + OFFSET`.
    pub const OFFSET: i64 = 2;
}

impl ModelConfig {
    /// A built-in preset (`minimal`, `default`, `large`).
    pub fn preset(name: &str) -> Result<Self> {
        let yaml = preset_yaml(name).ok_or_else(|| {
            Error::config(
                "model.preset",
                format!("unknown preset `{name}`; choose one of {PRESETS:?}"),
            )
        })?;
        let cfg: ModelConfig = serde_norway::from_str(yaml).map_err(|e| {
            Error::config("model.preset", format!("preset `{name}` is malformed: {e}"))
        })?;
        Ok(cfg)
    }

    /// Resolves a `model:` section: `preset` (default `minimal`) with any other keys
    /// overriding the preset's values. Unknown keys are rejected by name.
    pub fn from_spec(spec: &serde_norway::Value) -> Result<Self> {
        let mut overrides = match spec {
            serde_norway::Value::Null => serde_norway::Mapping::new(),
            serde_norway::Value::Mapping(m) => m.clone(),
            other => {
                return Err(Error::config(
                    "model",
                    format!("expected a mapping, found {other:?}"),
                ));
            }
        };
        let preset = spec_preset(spec)?;
        overrides.remove("preset");
        let base = preset_yaml(&preset).ok_or_else(|| {
            Error::config(
                "model.preset",
                format!("unknown preset `{preset}`; choose one of {PRESETS:?}"),
            )
        })?;
        let mut merged: serde_norway::Mapping = serde_norway::from_str(base).map_err(|e| {
            Error::config(
                "model.preset",
                format!("preset `{preset}` is malformed: {e}"),
            )
        })?;
        for (k, v) in overrides {
            merged.insert(k, v);
        }
        let cfg: ModelConfig = serde_norway::from_value(serde_norway::Value::Mapping(merged))
            .map_err(|e| Error::config("model", e.to_string()))?;
        Ok(cfg)
    }

    /// Checks every field; the error names the first bad field and the allowed values.
    pub fn validate(&self) -> Result<()> {
        let err = |f: &str, m: String| Err(Error::config(format!("model.{f}"), m));
        if self.hidden == 0 {
            return err("hidden", "must be > 0".into());
        }
        if self.n_layers == 0 {
            return err("n_layers", "must be > 0".into());
        }
        if self.n_heads == 0 || !self.hidden.is_multiple_of(self.n_heads) {
            return err(
                "n_heads",
                format!(
                    "{} heads do not divide hidden size {}",
                    self.n_heads, self.hidden
                ),
            );
        }
        if self.ffn_dim == 0 {
            return err("ffn_dim", "must be > 0".into());
        }
        if self.max_seq_len < 2 {
            return err(
                "max_seq_len",
                format!(
                    "{} leaves no room for a gene after [CLS]; must be > 1",
                    self.max_seq_len
                ),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return err("dropout", format!("{} is outside [0, 1)", self.dropout));
        }
        if self.expression == ExpressionEncoding::Binned && self.n_bins < 2 {
            return err(
                "n_bins",
                format!(
                    "{} bins; need at least 2 (bin 0 = zero plus one expressed bin)",
                    self.n_bins
                ),
            );
        }
        if !(self.mask_ratio > 0.0 && self.mask_ratio < 1.0) {
            return err(
                "mask_ratio",
                format!("{} is outside (0, 1)", self.mask_ratio),
            );
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return err(
                "label_smoothing",
                format!("{} is outside [0, 1)", self.label_smoothing),
            );
        }
        if self.projection_dim == 0 {
            return err("projection_dim", "must be > 0".into());
        }
        if self.latent_dim == Some(0) {
            return err(
                "latent_dim",
                "must be > 0 (or absent: no bottleneck)".into(),
            );
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return err(
                "temperature",
                format!("{} must be a positive number", self.temperature),
            );
        }
        for (f, w) in [
            ("w_mgem", self.w_mgem),
            ("w_contrastive", self.w_contrastive),
            ("w_gepc", self.w_gepc),
        ] {
            if !(w >= 0.0 && w.is_finite()) {
                return err(f, format!("{w} must be a finite number >= 0"));
            }
        }
        // Finite: checkpoints and exports keep the configuration as JSON, which has no
        // infinity (serde_json would write null, which no reader accepts).
        if !self.gepc_clip.is_finite() || self.gepc_clip <= 0.0 {
            return err(
                "gepc_clip",
                format!(
                    "{} must be a finite number > 0 (one above every |z| of the data, e.g. 1000, clips nothing)",
                    self.gepc_clip
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.metric_weight) {
            return err(
                "metric_weight",
                format!("{} is outside [0, 1]", self.metric_weight),
            );
        }
        if self.w_mgem == 0.0 && self.w_contrastive == 0.0 && self.w_gepc == 0.0 {
            return err(
                "w_mgem",
                "every loss weight is 0; nothing would be trained".into(),
            );
        }
        Ok(())
    }

    /// Checks the model against the gene vocabulary it will be built for.
    pub fn validate_vocab(&self, n_genes: usize) -> Result<()> {
        if n_genes == 0 {
            return Err(Error::config(
                "data",
                "the gene vocabulary is empty (no genes in the dataset)",
            ));
        }
        Ok(())
    }

    /// Number of rows of the gene-token embedding for `n_genes` genes.
    pub fn n_tokens(n_genes: usize) -> usize {
        n_genes + special::OFFSET as usize
    }

    /// Exact number of trainable parameters for a vocabulary of `n_genes` genes
    /// (matches the worker's model; checked by its tests).
    pub fn param_count(&self, n_genes: usize) -> usize {
        let h = self.hidden;
        let mut n = Self::n_tokens(n_genes) * h; // gene embedding
        n += match self.expression {
            ExpressionEncoding::Binned => (self.n_bins + 1) * h,
            ExpressionEncoding::Continuous => (h + h) + (h * h + h) + h,
        };
        if self.positional == Positional::Learned {
            n += self.max_seq_len * h;
        }
        n += 2 * h; // embedding LayerNorm
        let block = 2 * (2 * h)
            + (3 * h * h + 3 * h)
            + (h * h + h)
            + (self.ffn_dim * h + self.ffn_dim)
            + (h * self.ffn_dim + h);
        n += self.n_layers * block;
        n += 2 * h; // final LayerNorm
        let out = match self.expression {
            ExpressionEncoding::Binned => self.n_bins,
            ExpressionEncoding::Continuous => 1,
        };
        n += (h * h + h) + 2 * h + (out * h + out); // MGEM head
        let c = self.cell_dim();
        if let Some(d) = self.latent_dim {
            n += d * h + d; // the bottleneck
        }
        n += (c * h + h) + (self.projection_dim * h + self.projection_dim); // projection head
        if self.has_gepc() {
            n += match self.gepc_decoder {
                GepcDecoder::GeneQuery => (c * h + h) + (h * h + h), // cell and gene maps
                GepcDecoder::PerGene => n_genes * c,                 // one weight row per gene
            } + n_genes; // gene biases
            if self.gepc_detected {
                n += n_genes; // genes-detected slopes
            }
        }
        n
    }

    /// The cell embedding's size: `latent_dim` when set, else `hidden`.
    pub fn cell_dim(&self) -> usize {
        self.latent_dim.unwrap_or(self.hidden)
    }

    /// The cell embedding the model gives: `embedding`, except that a model without the
    /// GEPC decoder (`w_gepc: 0`, for instance over a preset that reads its cells out in the
    /// decoder's metric) gives the pooled vector.
    pub fn read_out(&self) -> CellEmbedding {
        if self.has_gepc() {
            self.embedding
        } else {
            CellEmbedding::Pooled
        }
    }

    /// Whether the model has the GEPC expression decoder (`w_gepc > 0`).
    pub fn has_gepc(&self) -> bool {
        self.w_gepc > 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_load_validate_and_have_documented_sizes() {
        let sizes: Vec<usize> = PRESETS
            .iter()
            .map(|p| {
                let c = ModelConfig::preset(p).unwrap();
                c.validate().unwrap();
                c.param_count(20_000)
            })
            .collect();
        assert!(
            (5_000_000..6_000_000).contains(&sizes[0]),
            "minimal {}",
            sizes[0]
        );
        assert!(
            (22_000_000..35_000_000).contains(&sizes[1]),
            "default {}",
            sizes[1]
        );
        assert!(
            (110_000_000..130_000_000).contains(&sizes[2]),
            "large {}",
            sizes[2]
        );
    }

    fn spec(y: &str) -> serde_norway::Value {
        serde_norway::from_str(y).unwrap()
    }

    #[test]
    fn gepc_clip_defaults_to_10_and_is_written_only_when_it_differs() {
        let c = ModelConfig::from_spec(&spec("preset: default")).unwrap();
        assert_eq!(c.gepc_clip, DEFAULT_GEPC_CLIP);
        let y = serde_norway::to_string(&c).unwrap();
        assert!(!y.contains("gepc_clip"), "{y}");
        let c = ModelConfig::from_spec(&spec("preset: default\ngepc_clip: 30")).unwrap();
        assert_eq!(c.gepc_clip, 30.0);
        let y = serde_norway::to_string(&c).unwrap();
        assert!(y.contains("gepc_clip: 30"), "{y}");
        let back: ModelConfig = serde_norway::from_str(&y).unwrap();
        assert_eq!(back, c);
        // The checkpoint's JSON round trip keeps a large clip; an infinite one is refused
        // when the config is read (JSON has no infinity).
        let big = ModelConfig::from_spec(&spec("gepc_clip: 1000")).unwrap();
        let back: ModelConfig =
            serde_json::from_str(&serde_json::to_string(&big).unwrap()).unwrap();
        assert_eq!(back.gepc_clip, 1000.0);
        // A checkpoint of the version that took `.inf` holds `null`: it reads as no clip
        // and validates.
        let mut v = serde_json::to_value(&big).unwrap();
        v["gepc_clip"] = serde_json::Value::Null;
        let old: ModelConfig = serde_json::from_value(v).unwrap();
        assert_eq!(old.gepc_clip, f64::MAX);
        old.validate().unwrap();
    }

    #[test]
    fn embedding_is_pooled_when_absent_and_written_only_when_not() {
        let c = ModelConfig::from_spec(&spec("preset: default")).unwrap();
        assert_eq!(c.embedding, CellEmbedding::Pooled);
        assert!(!serde_json::to_string(&c).unwrap().contains("embedding"));
        let d =
            ModelConfig::from_spec(&spec("preset: default\nembedding: decoder_metric")).unwrap();
        assert_eq!(d.embedding, CellEmbedding::DecoderMetric);
        d.validate().unwrap();
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains("\"embedding\":\"decoder_metric\""), "{json}");
        let back: ModelConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        // A read-out only: the parameters are the same.
        assert_eq!(d.param_count(2000), c.param_count(2000));
        assert_eq!(d.read_out(), CellEmbedding::DecoderMetric);
        // Without the decoder there is no metric: the pooled vector, and no error.
        let n = ModelConfig::from_spec(&spec("preset: minimal\nw_gepc: 0.0")).unwrap();
        n.validate().unwrap();
        assert_eq!(
            (n.embedding, n.read_out()),
            (CellEmbedding::DecoderMetric, CellEmbedding::Pooled)
        );
        let e = ModelConfig::from_spec(&spec("embedding: whitened")).unwrap_err();
        assert!(e.to_string().contains("whitened"), "{e}");
        // `minimal` reads its cells out in the decoder's metric; `pooled` overrides it.
        let m = ModelConfig::preset("minimal").unwrap();
        assert_eq!(m.embedding, CellEmbedding::DecoderMetric);
        let p = ModelConfig::from_spec(&spec("preset: minimal\nembedding: pooled")).unwrap();
        assert_eq!(p.embedding, CellEmbedding::Pooled);
    }

    #[test]
    fn metric_weight_is_1_when_absent_written_only_when_not_and_within_0_1() {
        let c =
            ModelConfig::from_spec(&spec("preset: default\nembedding: decoder_metric")).unwrap();
        assert_eq!(c.metric_weight, DEFAULT_METRIC_WEIGHT);
        assert!(!serde_json::to_string(&c).unwrap().contains("metric_weight"));
        let h = ModelConfig::from_spec(&spec(
            "preset: default\nembedding: decoder_metric\nmetric_weight: 0.5",
        ))
        .unwrap();
        assert_eq!(h.metric_weight, 0.5);
        let json = serde_json::to_string(&h).unwrap();
        assert!(json.contains("\"metric_weight\":0.5"), "{json}");
        assert_eq!(serde_json::from_str::<ModelConfig>(&json).unwrap(), h);
        assert_eq!(h.param_count(2000), c.param_count(2000));
        for bad in ["-0.1", "1.5", ".nan"] {
            let c = ModelConfig::from_spec(&spec(&format!("metric_weight: {bad}"))).unwrap();
            let e = c.validate().unwrap_err();
            assert!(e.to_string().contains("metric_weight"), "{bad}: {e}");
        }
    }

    #[test]
    fn latent_dim_is_optional_and_written_only_when_set() {
        let c = ModelConfig::from_spec(&spec("preset: minimal")).unwrap();
        assert_eq!((c.latent_dim, c.cell_dim()), (None, c.hidden));
        assert!(!serde_json::to_string(&c).unwrap().contains("latent_dim"));
        let l = ModelConfig::from_spec(&spec("preset: minimal\nlatent_dim: 16")).unwrap();
        assert_eq!((l.latent_dim, l.cell_dim()), (Some(16), 16));
        let back: ModelConfig = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
        // The bottleneck (128 x 16 + 16) replaces the heads' 128-wide inputs with 16-wide
        // ones: the projection head's first layer and the per-gene decoder's weights.
        let (h, g) = (c.hidden, 2000);
        let want = c.param_count(g) + (h * 16 + 16) - (h - 16) * h - (h - 16) * g;
        assert_eq!(l.param_count(g), want);
    }

    #[test]
    fn overrides_apply_and_unknown_keys_are_named() {
        let c = ModelConfig::from_spec(&spec("preset: default\nn_layers: 2")).unwrap();
        assert_eq!((c.hidden, c.n_layers), (512, 2));
        let e = ModelConfig::from_spec(&spec("hidden_size: 3"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `hidden_size`"), "{e}");
        let e = ModelConfig::from_spec(&spec("preset: huge"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.preset") && e.contains("huge"), "{e}");
        let e = ModelConfig::from_spec(&spec("positional: rotary"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rotary"), "{e}");
    }

    #[test]
    fn every_invalid_setting_is_rejected_with_its_message() {
        let cases: &[(&str, &str)] = &[
            ("hidden: 0", "invalid config `model.hidden`: must be > 0"),
            (
                "n_layers: 0",
                "invalid config `model.n_layers`: must be > 0",
            ),
            (
                "n_heads: 3",
                "invalid config `model.n_heads`: 3 heads do not divide hidden size 128",
            ),
            (
                "n_heads: 0",
                "invalid config `model.n_heads`: 0 heads do not divide hidden size 128",
            ),
            ("ffn_dim: 0", "invalid config `model.ffn_dim`: must be > 0"),
            (
                "max_seq_len: 1",
                "invalid config `model.max_seq_len`: 1 leaves no room for a gene after [CLS]; must be > 1",
            ),
            (
                "dropout: 1.0",
                "invalid config `model.dropout`: 1 is outside [0, 1)",
            ),
            (
                "expression: binned\nn_bins: 1",
                "invalid config `model.n_bins`: 1 bins; need at least 2 (bin 0 = zero plus one expressed bin)",
            ),
            (
                "mask_ratio: 0.0",
                "invalid config `model.mask_ratio`: 0 is outside (0, 1)",
            ),
            (
                "mask_ratio: 1.0",
                "invalid config `model.mask_ratio`: 1 is outside (0, 1)",
            ),
            (
                "mask_ratio: -0.1",
                "invalid config `model.mask_ratio`: -0.1 is outside (0, 1)",
            ),
            (
                "label_smoothing: 1.5",
                "invalid config `model.label_smoothing`: 1.5 is outside [0, 1)",
            ),
            (
                "projection_dim: 0",
                "invalid config `model.projection_dim`: must be > 0",
            ),
            (
                "temperature: 0.0",
                "invalid config `model.temperature`: 0 must be a positive number",
            ),
            (
                "w_mgem: -1.0",
                "invalid config `model.w_mgem`: -1 must be a finite number >= 0",
            ),
            (
                "gepc_clip: 0.0",
                "invalid config `model.gepc_clip`: 0 must be a finite number > 0 (one above every |z| of the data, e.g. 1000, clips nothing)",
            ),
            (
                "gepc_clip: .nan",
                "invalid config `model.gepc_clip`: NaN must be a finite number > 0 (one above every |z| of the data, e.g. 1000, clips nothing)",
            ),
            (
                "gepc_clip: .inf",
                "invalid config `model.gepc_clip`: inf must be a finite number > 0 (one above every |z| of the data, e.g. 1000, clips nothing)",
            ),
            (
                "latent_dim: 0",
                "invalid config `model.latent_dim`: must be > 0 (or absent: no bottleneck)",
            ),
            (
                "w_mgem: 0.0\nw_contrastive: 0.0\nw_gepc: 0.0",
                "invalid config `model.w_mgem`: every loss weight is 0; nothing would be trained",
            ),
        ];
        for (y, msg) in cases {
            let c = ModelConfig::from_spec(&spec(y)).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert_eq!(&e, msg, "for `{y}`");
        }
        // Continuous encoding does not use bins.
        ModelConfig::from_spec(&spec("expression: continuous\nn_bins: 0"))
            .unwrap()
            .validate()
            .unwrap();
        let e = ModelConfig::preset("minimal")
            .unwrap()
            .validate_vocab(0)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid config `data`: the gene vocabulary is empty (no genes in the dataset)"
        );
    }
}
