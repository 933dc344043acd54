//! Tests of the staged backward pass and the overlapped all-reduce: the same gradients as
//! one backward pass and one flat all-reduce, over real TCP rings on 127.0.0.1.

use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use scfm_common::config::ModelConfig;
use scfm_common::tokenizer::Batch;
use tch::{Device, Kind, Tensor, nn};

use super::*;
use crate::collective::{RingCollective, RingConfig, RingKey};
use crate::model::stages::Cuts;
use crate::model::{Inputs, ScfmModel};
use crate::step::{all_reduce_grads, forward_backward};

/// How long a test waits for a rank.
const JOIN: Duration = Duration::from_secs(60);

/// A small model with every part the backward pass crosses: three blocks, the GEPC
/// decoder (which shares the gene table with the embeddings), `pooling`. No dropout:
/// libtorch's generator is global, and tests (and ranks) run on parallel threads.
fn model(pooling: &str, seed: i64) -> (nn::VarStore, ScfmModel, FlatParams) {
    model_with(
        &format!("expression: continuous\npooling: {pooling}\nw_gepc: 1.0\ngepc_detected: true"),
        seed,
    )
}

/// A three-block model with `settings` (expression, pooling, decoder: YAML lines), its
/// parameters set from `seed` alone (the global generator is shared with other threads).
fn model_with(settings: &str, seed: i64) -> (nn::VarStore, ScfmModel, FlatParams) {
    let y = format!(
        "hidden: 16\nn_layers: 3\nn_heads: 2\nffn_dim: 32\nmax_seq_len: 8\nn_bins: 11\n\
         dropout: 0.0\nw_contrastive: 0.5\n{settings}"
    );
    let cfg = ModelConfig::from_spec(&serde_norway::from_str(&y).unwrap()).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = ScfmModel::new(&vs, &cfg, 24).unwrap();
    let mut p = FlatParams::new(&vs);
    let n = p.numel();
    let values = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * (0.7 + seed as f64)).sin() * 0.2;
    tch::no_grad(|| p.flat.shallow_clone().copy_(&values));
    p.attach_grads();
    (vs, model, p)
}

/// Two views of four cells, with profiles and masked tokens; `offset` varies the genes.
fn inputs(offset: i64) -> Inputs {
    let (n, len) = (8usize, 6usize);
    let mut b = Batch {
        n,
        len,
        ..Default::default()
    };
    for r in 0..n as i64 {
        for i in 0..len as i64 {
            let g = if i == 0 {
                1
            } else {
                2 + (r * 5 + i * 3 + offset) % 22
            };
            b.genes.push(g);
            b.target_bins.push(0);
            b.input_bins.push(0);
            let v = ((g * 7 + r) % 5) as f32 * 0.4;
            b.masked.push(i == 2 || (i == 4 && r % 2 == 0));
            b.input_values.push(if i == 2 { 0.0 } else { v });
            b.target_values.push(v);
        }
    }
    let mut x = Inputs::from_batch(&b, Device::Cpu);
    let g = Tensor::arange(24 * n as i64, (Kind::Float, Device::Cpu)).view([n as i64, 24]);
    x.profile = Some((g * 0.37 + offset as f64).sin().abs());
    x.detected = Some(Tensor::arange(n as i64, (Kind::Float, Device::Cpu)) * 0.1 - 0.3);
    x
}

fn host(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.reshape([-1])).unwrap()
}

#[test]
fn buckets_cover_every_gradient_once_in_stage_order() {
    let (_vs, _m, p) = model("mean", 0);
    let b = Buckets::new(&p, 3);
    assert_eq!(b.len(), 5);
    let mut seen = vec![0u8; p.numel() as usize];
    for s in 0..b.len() {
        assert!(b.numel(s) > 0, "stage {s} is empty");
        for r in &b.stages[s] {
            for e in &mut seen[r.clone()] {
                *e += 1;
            }
        }
    }
    assert!(
        seen.iter().all(|&c| c == 1),
        "a gradient is in no bucket or two"
    );
    // The embeddings (gene table included) are the last bucket.
    let embed: usize = p
        .slots
        .iter()
        .filter(|s| s.name.starts_with("embed."))
        .map(|s| s.numel as usize)
        .sum();
    assert_eq!(b.numel(4), embed);
}

/// The staged backward pass gives bit for bit the gradients of one backward pass, with
/// either pooling (they cut the stream in different code paths).
#[test]
fn a_staged_backward_equals_one_backward_bitwise() {
    for pooling in ["mean", "cls"] {
        let (_vs, m, p) = model(pooling, 1);
        let x = inputs(3);
        let loss_of = |out: &crate::model::TrainOutputs| {
            let mgem = m.mgem_loss_train(out, &x, tch::Reduction::Mean);
            let con = crate::model::loss::nt_xent(&out.proj, 0.2);
            mgem + con * 0.5 + m.gepc_loss(out.gepc.as_ref(), &x).unwrap()
        };
        tch::manual_seed(7);
        p.zero_grad();
        loss_of(&m.forward_train(&x, true)).backward();
        let one = host(&p.grad);
        tch::manual_seed(7);
        p.zero_grad();
        let mut cuts = Cuts::new();
        let out = m.forward_train_cut(&x, true, Some(&mut cuts));
        assert_eq!(
            cuts.len(),
            4,
            "{pooling}: a cut below every block and above the last"
        );
        let mut stages = Vec::new();
        backward_staged(&loss_of(&out), cuts, |s| stages.push(s));
        assert_eq!(stages, vec![0, 1, 2, 3, 4]);
        let staged = host(&p.grad);
        assert!(one.iter().any(|&g| g != 0.0));
        let differ = one
            .iter()
            .zip(&staged)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{pooling}: {differ} gradients differ");
    }
}

/// Per rank: the flat gradient after (forward, backward, flat all-reduce) and after
/// (forward, overlapped backward), and whether the overlapped step said so.
type RankGrads = (Vec<f32>, Vec<f32>, bool);

/// Runs `f(rank, ring)` on `w` ranks of a real TCP ring on 127.0.0.1 (receives time out
/// after `timeout`), one thread each; the results in rank order. Panics if a rank hangs.
fn on_ring<R, F>(w: usize, timeout: Duration, f: F) -> Vec<R>
where
    R: Send + 'static,
    F: Fn(usize, RingCollective) -> R + Send + Sync + 'static,
{
    let ls: Vec<TcpListener> = (0..w)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    let f = std::sync::Arc::new(f);
    let (tx, rx) = mpsc::channel();
    for (rank, l) in ls.into_iter().enumerate() {
        let (tx, addrs, f) = (tx.clone(), addrs.clone(), f.clone());
        std::thread::spawn(move || {
            let key = RingKey::derive(Some("t"), "overlap");
            let config = RingConfig::new(key, 1, timeout).with_bucket_bytes(256);
            let ring = RingCollective::new(rank, w, addrs, l, config).unwrap();
            let _ = tx.send((rank, f(rank, ring)));
        });
    }
    let mut out: Vec<Option<R>> = (0..w).map(|_| None).collect();
    for _ in 0..w {
        let (rank, r) = rx.recv_timeout(JOIN).expect("a rank hung");
        out[rank] = Some(r);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Runs both ways on `w` ranks of a real ring, rank `r` on its own cells.
fn both_ways(w: usize, pooling: &'static str) -> Vec<RankGrads> {
    on_ring(w, Duration::from_secs(20), move |rank, mut ring| {
        // Every rank starts from the same parameters (set from the seed, not the rank).
        let (_vs, m, p) = model(pooling, 5);
        let x = [inputs(rank as i64)];
        let b = Buckets::new(&p, 3);
        p.zero_grad();
        forward_backward(&m, &x, 9, 4, false, false, &mut ring, None).unwrap();
        all_reduce_grads(&p, &mut ring).unwrap();
        let flat = host(&p.grad);
        p.zero_grad();
        let l =
            forward_backward(&m, &x, 9, 4, false, false, &mut ring, Some((&b, &p.grad))).unwrap();
        (flat, host(&p.grad), l.overlapped.is_some())
    })
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Two ranks: the overlapped all-reduce equals the flat one bit for bit (one addition per
/// element either way) and the ranks agree.
#[test]
fn two_ranks_overlapped_equal_the_flat_all_reduce_bitwise() {
    let r = both_ways(2, "mean");
    for (rank, (flat, overlapped, said)) in r.iter().enumerate() {
        assert!(said, "rank {rank} did not overlap");
        assert!(
            same_bits(flat, overlapped),
            "rank {rank}: overlapped != flat"
        );
    }
    assert!(same_bits(&r[0].1, &r[1].1), "the ranks differ");
    // The gradients were averaged, not left local: rank 0's local gradient differs.
    assert!(r[0].1.iter().any(|&g| g != 0.0));
}

/// Three ranks: bit-identical on every rank; the buckets sum in another order than the
/// flat buffer's chunks, so the values agree with the flat all-reduce to rounding.
#[test]
fn three_ranks_overlapped_agree_across_ranks() {
    let r = both_ways(3, "cls");
    for (rank, (flat, overlapped, said)) in r.iter().enumerate() {
        assert!(said, "rank {rank} did not overlap");
        assert!(
            same_bits(overlapped, &r[0].1),
            "rank {rank} differs from rank 0"
        );
        let worst = flat
            .iter()
            .zip(overlapped)
            .map(|(a, b)| (a - b).abs() / a.abs().max(1e-3))
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "rank {rank}: relative difference {worst}");
    }
}

/// A peer that dies during the overlapped all-reduce is an error naming the collective,
/// not a hang or a panic, and the backward pass still completes.
#[test]
fn a_dead_peer_during_an_overlapped_all_reduce_is_an_error() {
    let r = on_ring(2, Duration::from_secs(5), |rank, mut ring| {
        let (_vs, m, p) = model("mean", 5);
        if rank == 1 {
            // Rank 1 leaves as soon as the ring formed.
            drop(ring);
            return Ok(());
        }
        let b = Buckets::new(&p, 3);
        let x = inputs(0);
        let mut cuts = Cuts::new();
        let out = m.forward_train_cut(&x, true, Some(&mut cuts));
        let loss = out.proj.sum(Kind::Float) + out.mgem.sum(Kind::Float);
        backward_overlapped(&loss, cuts, &b, &p.grad, &mut ring)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let e = r[0].clone().expect_err("rank 0 should fail");
    assert!(e.contains("rank 1"), "{e}");
}

/// Each bucket's gradients are final when its stage is reported done: a copy taken then
/// equals the gradients at the end of the backward pass, and is not all zero. For every
/// kind of model the stages must hold for (which parameter goes in which bucket follows
/// the parameter names): both expression encodings, both poolings, every positional
/// encoding, with and without the GEPC decoder and its options.
#[test]
fn every_bucket_is_final_when_its_stage_is_reported() {
    for settings in [
        "expression: continuous\npooling: mean\nw_gepc: 1.0\ngepc_detected: true",
        "expression: continuous\npooling: cls\nw_gepc: 1.0\ngepc_detected: true",
        "expression: binned\npooling: mean\npositional: learned\nw_gepc: 1.0",
        "expression: binned\npooling: cls\npositional: sinusoidal\nw_gepc: 0.0",
        "expression: continuous\npooling: mean\npositional: learned\nw_gepc: 1.0\ngepc_genes: unseen",
    ] {
        let (_vs, m, p) = model_with(settings, 2);
        let b = Buckets::new(&p, 3);
        let x = inputs(1);
        p.zero_grad();
        let mut cuts = Cuts::new();
        let out = m.forward_train_cut(&x, true, Some(&mut cuts));
        let mut loss = m.mgem_loss_train(&out, &x, tch::Reduction::Mean)
            + crate::model::loss::nt_xent(&out.proj, 0.2);
        if let Some(g) = m.gepc_loss(out.gepc.as_ref(), &x) {
            loss += g;
        }
        let mut copies: Vec<(usize, Vec<f32>)> = Vec::new();
        let bucket = |s: usize, g: &[f32]| -> Vec<f32> {
            b.stages[s]
                .iter()
                .flat_map(|r| g[r.clone()].to_vec())
                .collect()
        };
        backward_staged(&loss, cuts, |s| copies.push((s, bucket(s, &host(&p.grad)))));
        assert_eq!(copies.len(), b.len(), "{settings}: a stage per bucket");
        let end = host(&p.grad);
        for (s, at_done) in &copies {
            assert!(
                at_done.iter().any(|&g| g != 0.0),
                "{settings}: stage {s} empty"
            );
            assert!(
                same_bits(at_done, &bucket(*s, &end)),
                "{settings}: stage {s} changed after it was reported done"
            );
        }
    }
}
