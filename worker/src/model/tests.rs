//! Model unit tests: shapes, padding, aliasing of flat parameters, losses on hand-computed cases.

use scfm_common::config::ModelConfig;
use scfm_common::tokenizer::Batch;
use tch::{Device, Kind, Tensor, nn};

use super::*;
use crate::params::FlatParams;

fn small(extra: &str) -> ModelConfig {
    let y = format!(
        "hidden: 16\nn_layers: 2\nn_heads: 4\nffn_dim: 32\nmax_seq_len: 10\nn_bins: 7\ndropout: 0.0\n{extra}"
    );
    ModelConfig::from_spec(&serde_norway::from_str(&y).unwrap()).unwrap()
}

fn batch(rows: &[&[i64]]) -> Batch {
    let len = rows.iter().map(|r| r.len()).max().unwrap();
    let mut b = Batch {
        n: rows.len(),
        len,
        ..Default::default()
    };
    for r in rows {
        for i in 0..len {
            let g = r.get(i).copied().unwrap_or(0);
            b.genes.push(g);
            let bin = if i == 0 || g == 0 { 0 } else { 1 + (g % 6) };
            b.input_bins.push(if i == 2 { 7 } else { bin });
            b.target_bins.push(bin);
            b.input_values.push(if i == 2 || g == 0 {
                0.0
            } else {
                bin as f32 * 0.3
            });
            b.target_values.push(bin as f32 * 0.3);
            b.masked.push(i == 2 && g != 0);
        }
    }
    b
}

#[test]
fn shapes_and_exact_parameter_count() {
    for extra in [
        "",
        "expression: continuous\npositional: sinusoidal\npooling: mean",
        "positional: learned",
        "w_gepc: 1.0\ngepc_detected: true",
        "w_gepc: 1.0\ngepc_decoder: per_gene\ngepc_detected: true",
        "w_gepc: 1.0\nlatent_dim: 6",
        "pooling: mean\nw_gepc: 1.0\ngepc_decoder: per_gene\nlatent_dim: 6",
    ] {
        let cfg = small(extra);
        let vs = nn::VarStore::new(Device::Cpu);
        let m = ScfmModel::new(&vs, &cfg, 30).unwrap();
        let n: usize = vs.trainable_variables().iter().map(|t| t.numel()).sum();
        assert_eq!(n, cfg.param_count(30));
        let b = batch(&[
            &[1, 5, 6, 7],
            &[1, 9, 3, 0],
            &[1, 4, 8, 11],
            &[1, 2, 12, 13],
        ]);
        let o = m.forward(&Inputs::from_batch(&b, Device::Cpu), false);
        assert_eq!(o.hidden.size(), vec![4, 4, 16]);
        let c = if cfg.expression == scfm_common::config::ExpressionEncoding::Binned {
            7
        } else {
            1
        };
        assert_eq!(o.mgem.size(), vec![4, 4, c]);
        assert_eq!(o.cell.size(), vec![4, cfg.cell_dim() as i64]);
        assert_eq!(o.proj.size(), vec![4, 128]);
        if let Some(g) = &o.gepc {
            assert_eq!(g.size(), vec![4, 30]);
        }
        let norms = o.proj.norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
        assert!(norms.allclose(
            &Tensor::ones([4], (Kind::Float, Device::Cpu)),
            1e-5,
            1e-5,
            false
        ));
    }
}

#[test]
fn padding_does_not_change_real_tokens() {
    for extra in ["", "pooling: mean\nexpression: continuous"] {
        let cfg = small(extra);
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let m = ScfmModel::new(&vs, &cfg, 30).unwrap();
        let short = batch(&[&[1, 5, 6, 7], &[1, 9, 3, 4]]);
        let long = batch(&[&[1, 5, 6, 7, 0, 0, 0], &[1, 9, 3, 4, 0, 0, 0]]);
        let a = m.forward(&Inputs::from_batch(&short, Device::Cpu), false);
        let b = m.forward(&Inputs::from_batch(&long, Device::Cpu), false);
        let diff = (a.hidden - b.hidden.narrow(1, 0, 4))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "hidden differs by {diff}");
        let diff = (a.cell - b.cell).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "cell embedding differs by {diff}");
    }
}

#[test]
fn nt_xent_matches_hand_computation() {
    // Views (0, 2) and (1, 3) are pairs; rows are unit vectors.
    let z = Tensor::from_slice(&[1f32, 0., 0., 1., 1., 0., 0., 1.]).view([4, 2]);
    // Anchor 0: similarities to rows 1, 2, 3 are 0, 1, 0 (τ = 1); the positive is row 2.
    let e = std::f64::consts::E;
    let want = -(e / (2.0 + e)).ln();
    let got = loss::nt_xent(&z, 1.0).double_value(&[]);
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    // Temperature scales the logits.
    let want = -((1.0f64 / 0.5).exp() / (2.0 + (1.0f64 / 0.5).exp())).ln();
    assert!((loss::nt_xent(&z, 0.5).double_value(&[]) - want).abs() < 1e-6);
}

#[test]
fn masked_losses_use_only_masked_tokens() {
    let logits = Tensor::zeros([1, 3, 4], (Kind::Float, Device::Cpu));
    let targets = Tensor::from_slice(&[0i64, 2, 3]).view([1, 3]);
    let masked = Tensor::from_slice(&[0u8, 1, 0])
        .view([1, 3])
        .to_kind(Kind::Bool);
    let ce = loss::mgem_cross_entropy(&logits, &targets, &masked, 0.0, tch::Reduction::Mean)
        .double_value(&[]);
    assert!((ce - 4f64.ln()).abs() < 1e-6);
    let pred = Tensor::from_slice(&[5f32, 1.0, 9.0]).view([1, 3, 1]);
    let vals = Tensor::from_slice(&[0f32, 3.0, 0.0]).view([1, 3]);
    assert!(
        (loss::mgem_squared_error(&pred, &vals, &masked, tch::Reduction::Mean).double_value(&[])
            - 4.0)
            .abs()
            < 1e-6
    );
}

#[test]
fn invalid_config_is_rejected_before_building() {
    let mut cfg = small("");
    cfg.n_heads = 5;
    let vs = nn::VarStore::new(Device::Cpu);
    let e = ScfmModel::new(&vs, &cfg, 30).unwrap_err().to_string();
    assert_eq!(
        e,
        "invalid config `model.n_heads`: 5 heads do not divide hidden size 16"
    );
    assert!(vs.variables().is_empty());
    let e = ScfmModel::new(&vs, &small(""), 0).unwrap_err().to_string();
    assert!(e.contains("gene vocabulary is empty"), "{e}");
}

#[test]
fn flat_params_alias_parameters_and_gradients() {
    let cfg = small("");
    let vs = nn::VarStore::new(Device::Cpu);
    let m = ScfmModel::new(&vs, &cfg, 30).unwrap();
    let mut p = FlatParams::new(&vs);
    p.attach_grads();
    assert!(p.check_aliasing());
    let b = Inputs::from_batch(&batch(&[&[1, 5, 6, 7], &[1, 9, 3, 4]]), Device::Cpu);
    let before = m.forward(&b, false).hidden;
    for _ in 0..2 {
        p.zero_grad();
        m.losses(&b, false).total.backward();
    }
    assert!(p.check_aliasing(), "gradients must accumulate in place");
    assert!(p.grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    // Writing the flat buffer changes what the model computes.
    tch::no_grad(|| {
        let _ = p.flat.shallow_clone().g_add_scalar_(0.01);
    });
    let after = m.forward(&b, false).hidden;
    assert!((before - after).abs().max().double_value(&[]) > 1e-4);
    // Two accumulated backward passes = twice one pass.
    p.zero_grad();
    m.losses(&b, false).total.backward();
    let one = p.grad.copy();
    m.losses(&b, false).total.backward();
    assert!(p.grad.allclose(&(one * 2.0), 1e-5, 1e-6, false));
}

#[test]
fn bf16_compute_stays_close_to_fp32_and_trains() {
    let cfg = small("");
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut m = ScfmModel::new(&vs, &cfg, 30).unwrap();
    let mut p = FlatParams::new(&vs);
    p.attach_grads();
    let b = Inputs::from_batch(
        &batch(&[
            &[1, 5, 6, 7],
            &[1, 9, 3, 4],
            &[1, 2, 8, 10],
            &[1, 11, 12, 13],
        ]),
        Device::Cpu,
    );
    let fp32 = m.losses(&b, false);
    m.set_compute_kind(Some(Kind::BFloat16));
    let bf16 = m.losses(&b, false);
    assert_eq!(bf16.total.kind(), Kind::Float, "losses are reduced in fp32");
    let d = (fp32.mgem - bf16.mgem)
        .abs()
        .max((fp32.contrastive - bf16.contrastive).abs());
    assert!(d < 2e-2, "bf16 losses differ from fp32 by {d}");
    p.zero_grad();
    bf16.total.backward();
    assert!(
        p.check_aliasing(),
        "bf16 gradients land in the fp32 flat buffer"
    );
    assert!(
        p.grad.isfinite().all().int64_value(&[]) == 1
            && p.grad.abs().sum(Kind::Float).double_value(&[]) > 0.0
    );
}

#[test]
fn blocked_nt_xent_equals_plain_for_one_block_and_pairs_within_blocks() {
    tch::manual_seed(1);
    let z = super::heads::l2_normalize(&Tensor::randn([8, 5], (Kind::Float, Device::Cpu)));
    let a = loss::nt_xent(&z, 0.3).double_value(&[]);
    let b = loss::nt_xent_blocks(&z, 0.3, 1).double_value(&[]);
    assert!((a - b).abs() < 1e-6);
    // Two blocks of 4 rows: rows (0,2), (1,3), (4,6), (5,7) are pairs. Reordering rows
    // so that the same pairs form one block layout must give the same loss.
    let two = loss::nt_xent_blocks(&z, 0.3, 2).double_value(&[]);
    let perm = Tensor::from_slice(&[0i64, 1, 4, 5, 2, 3, 6, 7]);
    let one = loss::nt_xent(&z.index_select(0, &perm), 0.3).double_value(&[]);
    assert!((two - one).abs() < 1e-6, "{two} vs {one}");
}

#[test]
fn training_forward_equals_full_forward() {
    for extra in [
        "",
        "expression: continuous",
        "positional: learned\nlabel_smoothing: 0.1",
        "pooling: mean",
        "pooling: cls",
        "pooling: cls\nexpression: binned",
        "pooling: cls\nlatent_dim: 5",
        "pooling: mean\nlatent_dim: 5",
    ] {
        let cfg = small(extra);
        tch::manual_seed(9);
        let vs = nn::VarStore::new(Device::Cpu);
        let m = ScfmModel::new(&vs, &cfg, 30).unwrap();
        let mut p = FlatParams::new(&vs);
        p.attach_grads();
        // Rows with 1 and 2 masked tokens (padding included) exercise the query padding.
        let mut b = batch(&[
            &[1, 5, 6, 7, 8],
            &[1, 9, 3, 0, 0],
            &[1, 4, 8, 11, 12],
            &[1, 2, 12, 13, 0],
        ]);
        b.masked[4] = true;
        b.input_bins[4] = 7;
        let x = Inputs::from_batch(&b, Device::Cpu);
        let full = m.forward(&x, false);
        let fast = m.forward_train(&x, false);
        let c = full.mgem.size()[2];
        let want = full
            .mgem
            .masked_select(&x.masked.unsqueeze(-1))
            .view([-1, c]);
        let d = (&want - &fast.mgem).abs().max().double_value(&[]);
        assert!(d < 1e-5, "masked logits differ by {d} ({extra})");
        assert!((&full.proj - &fast.proj).abs().max().double_value(&[]) < 1e-5);
        // Gradients agree too.
        p.zero_grad();
        m.mgem_loss(&full, &x).backward();
        let g_full = p.grad.copy();
        p.zero_grad();
        m.mgem_loss_train(&fast, &x, tch::Reduction::Mean)
            .backward();
        let d = (&g_full - &p.grad).abs().max().double_value(&[]);
        assert!(d < 1e-5, "gradients differ by {d} ({extra})");
    }
}

/// `gepc_detected` adds one slope per gene times each cell's genes-detected covariate
/// (computed from the clean profile's values above 0) to the decoder's predictions, and
/// without the flag the model has no slopes.
#[test]
fn gepc_detected_shifts_predictions_by_the_cells_covariate() {
    use scfm_common::tokenizer::Profiles;
    assert!(
        (heads::detected_covariate(&[0.0, 1.5, 0.2]) - ((3.0f64).ln() - 5.0) as f32).abs() < 1e-7
    );
    let n_genes = 12;
    let names = |extra: &str| {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = ScfmModel::new(&vs, &small(extra), n_genes).unwrap();
        vs.variables().contains_key("gepc.detected")
    };
    assert!(!names("pooling: mean\nw_gepc: 1.0\ngepc_detected: false"));
    assert!(names("pooling: mean\nw_gepc: 1.0\ngepc_detected: true"));

    let vs = nn::VarStore::new(Device::Cpu);
    let model = ScfmModel::new(
        &vs,
        &small("pooling: mean\nw_gepc: 1.0\ngepc_detected: true"),
        n_genes,
    )
    .unwrap();
    let mut b = batch(&[&[1, 3, 4, 5], &[1, 6, 7]]);
    let (g0, v0): (&[u32], &[f32]) = (&[1, 2, 3], &[0.5, 1.0, 2.0]);
    let (g1, v1): (&[u32], &[f32]) = (&[4], &[0.7]);
    b.set_profiles(Profiles::from_rows([(g0, v0), (g1, v1)]));
    let x = Inputs::from_batch_with_profiles(&b, Device::Cpu, Some(n_genes));
    let d = x.detected.as_ref().expect("covariates with the profiles");
    let want = [(4.0f64).ln() - 5.0, (2.0f64).ln() - 5.0];
    for (i, w) in want.iter().enumerate() {
        assert!((d.double_value(&[i as i64]) - w).abs() < 1e-6);
    }
    let before = model.forward(&x, false).gepc.unwrap();
    let mut slopes = vs.variables()["gepc.detected"].shallow_clone();
    tch::no_grad(|| {
        slopes.copy_(&Tensor::arange(n_genes as i64, (Kind::Float, Device::Cpu)));
    });
    let after = model.forward(&x, false).gepc.unwrap();
    let want = d.unsqueeze(-1) * slopes.unsqueeze(0);
    assert!((after - before - want).abs().max().double_value(&[]) < 1e-5);
}

/// `gepc_genes: unseen` scores only the genes a view does not show unmasked: `[CLS]`,
/// padding and masked tokens hide nothing, and the loss is the squared error averaged
/// over exactly those entries.
#[test]
fn unseen_gepc_genes_leave_out_the_visible_tokens() {
    // Rows: tokens [CLS]=1, genes 5, 6 (masked: position 2), 7 / [CLS], 9, 3 (masked), pad.
    let b = batch(&[&[1, 5, 6, 7], &[1, 9, 3, 0]]);
    let x = Inputs::from_batch(&b, Device::Cpu);
    let g = 12;
    let w = unseen_genes(&x, g);
    let w: Vec<f32> = Vec::<f32>::try_from(&w.reshape([-1])).unwrap();
    let mut want = vec![1.0f32; 2 * g as usize];
    // Visible: row 0 genes 5 and 7 (vocabulary 3 and 5); row 1 gene 9 (vocabulary 7).
    for (r, tok) in [(0usize, 5i64), (0, 7), (1, 9)] {
        want[r * g as usize + (tok - special::OFFSET) as usize] = 0.0;
    }
    assert_eq!(w, want);

    let cfg = small("expression: continuous\npooling: mean\nw_gepc: 1.0\ngepc_genes: unseen");
    let vs = nn::VarStore::new(Device::Cpu);
    let m = ScfmModel::new(&vs, &cfg, g as usize).unwrap();
    let mut x = x;
    let target = Tensor::arange(2 * g, (Kind::Float, Device::Cpu)).view([2, g]) * 0.1;
    x.profile = Some(target.shallow_clone());
    let pred = target.ones_like();
    let loss = m.gepc_loss(Some(&pred), &x).unwrap().double_value(&[]);
    let t: Vec<f32> = Vec::<f32>::try_from(&target.reshape([-1])).unwrap();
    let (mut sum, mut n) = (0.0f64, 0.0f64);
    for (v, k) in t.iter().zip(&want) {
        sum += (*k * (1.0 - v) * (1.0 - v)) as f64;
        n += *k as f64;
    }
    assert!((loss - sum / n).abs() < 1e-6, "{loss} vs {}", sum / n);
    // `all` averages over every entry.
    let all = small("expression: continuous\npooling: mean\nw_gepc: 1.0");
    let m = ScfmModel::new(&nn::VarStore::new(Device::Cpu), &all, g as usize).unwrap();
    let full = m.gepc_loss(Some(&pred), &x).unwrap().double_value(&[]);
    let mean: f64 = t
        .iter()
        .map(|v| ((1.0 - v) * (1.0 - v)) as f64)
        .sum::<f64>()
        / t.len() as f64;
    assert!((full - mean).abs() < 1e-6);
}

/// The training forward runs the GEPC decoder only for a batch with profiles (its loss's
/// targets), and then gives the full forward's predictions, for either pooling.
#[test]
fn training_forward_runs_the_decoder_only_with_profiles() {
    use scfm_common::tokenizer::Profiles;
    let n_genes = 12;
    for pooling in ["mean", "cls"] {
        let cfg = small(&format!("pooling: {pooling}\nw_gepc: 1.0"));
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let m = ScfmModel::new(&vs, &cfg, n_genes).unwrap();
        let mut b = batch(&[&[1, 3, 4, 5], &[1, 6, 7, 0]]);
        let without = Inputs::from_batch(&b, Device::Cpu);
        assert!(m.forward_train(&without, false).gepc.is_none());
        let (g0, v0): (&[u32], &[f32]) = (&[1, 2, 3], &[0.5, 1.0, 2.0]);
        let (g1, v1): (&[u32], &[f32]) = (&[4], &[0.7]);
        b.set_profiles(Profiles::from_rows([(g0, v0), (g1, v1)]));
        let with = Inputs::from_batch_with_profiles(&b, Device::Cpu, Some(n_genes));
        let fast = m.forward_train(&with, false).gepc.expect("profiles given");
        let full = m.forward(&with, false).gepc.unwrap();
        let d = (fast - full).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{pooling}: decoder outputs differ by {d}");
    }
}

#[test]
fn decoder_metric_distances_are_the_decoded_profiles_rms_distances() {
    for extra in [
        "w_gepc: 1.0\ngepc_decoder: per_gene\ngepc_detected: true",
        "w_gepc: 1.0",
        "pooling: mean\nw_gepc: 1.0\ngepc_decoder: per_gene\nlatent_dim: 6",
    ] {
        // At weight 1 (the preset's is 0.5): the decoder's metric itself.
        let cfg = small(&format!("{extra}\nmetric_weight: 1.0"));
        let vs = nn::VarStore::new(Device::Cpu);
        let m = ScfmModel::new(&vs, &cfg, 30).unwrap();
        let s = m.decoder_metric().unwrap();
        let c = cfg.cell_dim() as i64;
        assert_eq!(s.size(), vec![c, c], "{extra}");
        assert!(s.allclose(&s.transpose(0, 1), 1e-6, 1e-7, false), "{extra}");
        tch::manual_seed(5);
        let cells = Tensor::randn([6, c], (Kind::Float, Device::Cpu));
        // The covariate shifts every gene of a cell by the cell's own amount: the metric
        // leaves it (and the biases) out, so compare the decoded profiles without it.
        let decoded = m.gepc_forward(&cells, None).unwrap();
        let read = cells.matmul(&s);
        for i in 0..6 {
            for j in 0..i {
                let dist = |t: &Tensor| (t.get(i) - t.get(j)).square().sum(Kind::Double);
                let want = dist(&decoded).double_value(&[]) / 30.0;
                let got = dist(&read).double_value(&[]);
                assert!(
                    (got - want).abs() <= 1e-4 * want.max(1e-6),
                    "{extra}: {got} vs {want}"
                );
            }
        }
    }
    let vs = nn::VarStore::new(Device::Cpu);
    let none = ScfmModel::new(&vs, &small("w_gepc: 0.0"), 30).unwrap();
    assert!(none.decoder_metric().is_none());
}

#[test]
fn metric_weight_moves_the_read_out_along_the_geometric_path() {
    // S(w) = A^(w/2): S(0.5)² = S(1) (the metric tensor at 0.5 is the geometric mean of
    // the identity's and the decoder's), and S(0) = I (the pooled vector as it is).
    let base =
        "w_gepc: 1.0\ngepc_decoder: per_gene\ngepc_detected: true\nembedding: decoder_metric";
    let read = |w: &str| {
        let cfg = small(&format!("{base}\nmetric_weight: {w}"));
        let vs = nn::VarStore::new(Device::Cpu);
        tch::manual_seed(11);
        let m = ScfmModel::new(&vs, &cfg, 30).unwrap();
        m.decoder_metric().unwrap()
    };
    let (full, half, zero) = (read("1.0"), read("0.5"), read("0.0"));
    let c = full.size()[0];
    assert!(half.allclose(&half.transpose(0, 1), 1e-6, 1e-7, false));
    let sq = half.matmul(&half);
    let d = (&sq - &full).abs().max().double_value(&[]);
    assert!(
        d < 1e-4 * full.abs().max().double_value(&[]),
        "S(0.5)² − S(1): {d}"
    );
    let eye = Tensor::eye(c, (Kind::Float, Device::Cpu));
    assert!(zero.allclose(&eye, 1e-5, 1e-6, false));
}

/// 32 rows of lengths 2 to 10 (`[CLS]` included), one or two masked tokens each, with
/// profiles for the decoder: a batch whose padding grouping by length saves.
fn ragged_batch(n_genes: usize) -> Batch {
    use scfm_common::tokenizer::Profiles;
    let rows: Vec<Vec<i64>> = (0..32)
        .map(|r| {
            let len = 2 + (r * 7 % 9);
            (0..len)
                .map(|i| {
                    if i == 0 {
                        1
                    } else {
                        2 + ((r + 3 * i) % 20) as i64
                    }
                })
                .collect()
        })
        .collect();
    let refs: Vec<&[i64]> = rows.iter().map(|r| r.as_slice()).collect();
    let mut b = batch(&refs);
    // A second masked token in the rows long enough for one.
    for (r, row) in rows.iter().enumerate() {
        if row.len() > 5 && r % 2 == 0 {
            let at = r * b.len + 4;
            b.masked[at] = true;
            b.input_bins[at] = 7;
            b.input_values[at] = 0.0;
        }
    }
    let profiles: Vec<(Vec<u32>, Vec<f32>)> = rows
        .iter()
        .map(|row| {
            let mut g: Vec<u32> = row[1..].iter().map(|&t| (t - 2) as u32).collect();
            g.sort();
            g.dedup();
            let v = g.iter().map(|&x| 0.2 + 0.1 * x as f32).collect();
            (g, v)
        })
        .collect();
    b.set_profiles(Profiles::from_rows(
        profiles.iter().map(|(g, v)| (g.as_slice(), v.as_slice())),
    ));
    let _ = n_genes;
    b
}

/// Rows run in groups of similar length give the same outputs and gradients as the batch
/// run whole, for either pooling, through a plain and a staged backward; and the grouping
/// is used on this batch (it saves padding).
#[test]
fn length_groups_change_no_output_or_gradient() {
    let n_genes = 22;
    for extra in [
        "pooling: mean\nw_gepc: 1.0\ngepc_decoder: per_gene\ngepc_detected: true",
        "pooling: cls\nw_gepc: 1.0",
        "pooling: cls\nexpression: binned\nlatent_dim: 5",
    ] {
        let cfg = small(extra);
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut m = ScfmModel::new(&vs, &cfg, n_genes).unwrap();
        let mut p = FlatParams::new(&vs);
        p.attach_grads();
        let b = ragged_batch(n_genes);
        let x = Inputs::from_batch_with_profiles(&b, Device::Cpu, Some(n_genes));
        let g = groups::Groups::of_inputs(&x, 4).expect("this batch is grouped");
        assert!(g.groups.len() >= 2, "{extra}");
        let run = |m: &ScfmModel, p: &mut FlatParams, staged: bool| {
            p.zero_grad();
            let mut cuts = stages::Cuts::new();
            let out = m.forward_train_cut(&x, true, staged.then_some(&mut cuts));
            let l = m.mgem_loss_train(&out, &x, tch::Reduction::Mean)
                + loss::nt_xent(&out.proj, 0.1)
                + m.gepc_loss(out.gepc.as_ref(), &x)
                    .unwrap_or_else(|| Tensor::from(0.0f32));
            if staged {
                assert_eq!(cuts.len(), cfg.n_layers + 1, "{extra}");
                stages::backward_staged(&l, cuts, |_| {});
            } else {
                l.backward();
            }
            (out, p.grad.copy())
        };
        m.set_length_groups(1);
        let (whole, g_whole) = run(&m, &mut p, false);
        m.set_length_groups(4);
        for staged in [false, true] {
            let (grouped, g_grouped) = run(&m, &mut p, staged);
            let close = |a: &Tensor, b: &Tensor, what: &str| {
                assert_eq!(a.size(), b.size(), "{what} ({extra})");
                // Relative to the largest value: sums over fewer padded keys round
                // differently.
                let scale = a.abs().max().double_value(&[]).max(1.0);
                let d = (a - b).abs().max().double_value(&[]) / scale;
                assert!(d < 1e-5, "{what} differs by {d} ({extra}, staged {staged})");
            };
            close(&whole.mgem, &grouped.mgem, "MGEM outputs");
            close(&whole.cell, &grouped.cell, "cell embeddings");
            close(&whole.proj, &grouped.proj, "projections");
            if let (Some(a), Some(b)) = (&whole.gepc, &grouped.gepc) {
                close(a, b, "decoder outputs");
            }
            close(&g_whole, &g_grouped, "gradients");
        }
        // Inference: the same cell embeddings grouped or whole.
        let cells = m.encode_cells(&x, false);
        m.set_length_groups(1);
        let d = (m.encode_cells(&x, false) - cells)
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-5, "inference embeddings differ by {d} ({extra})");
    }
}
