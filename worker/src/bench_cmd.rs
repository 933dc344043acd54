//! The benchmark commands of `scfm-worker`: `bench`, `bench-embed`, `bench-step`,
//! `nccl-check` and `bench-allreduce`: their arguments and what each runs.

use std::path::PathBuf;

use anyhow::{Context, Result};
use scfm_worker::Rt;

use crate::model_cmd::device_choice;

/// The benchmark protocol's settings (`scfm_worker::bench_protocol::Protocol`).
#[derive(clap::Args)]
pub(crate) struct ProtocolArgs {
    /// Timed rounds per side (the order of the sides alternates every round).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Minimum seconds of one round (whole units of work: steps, passes over the cells).
    #[arg(long, default_value_t = 10.0)]
    round_seconds: f64,
    /// Untimed seconds each side runs first (PyTorch's compile happens here).
    #[arg(long, default_value_t = 10.0)]
    warmup_seconds: f64,
    /// Largest spread, (max - min) / median of a side's rounds, at which a ratio is
    /// printed.
    #[arg(long, default_value_t = 0.25)]
    max_spread: f64,
}

impl ProtocolArgs {
    fn protocol(&self) -> scfm_worker::bench_protocol::Protocol {
        scfm_worker::bench_protocol::Protocol {
            rounds: self.rounds,
            round_s: self.round_seconds,
            warmup_s: self.warmup_seconds,
            max_spread: self.max_spread,
        }
    }
}

/// Arguments of `bench`.
#[derive(clap::Args)]
pub(crate) struct BenchCli {
    /// Presets to measure.
    #[arg(long, value_delimiter = ',', default_value = "minimal,default")]
    presets: Vec<String>,
    /// Cells per batch (two views each).
    #[arg(long, default_value_t = 8)]
    cells: usize,
    /// Tokens per sequence (default: the preset's max_seq_len).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Gene vocabulary size.
    #[arg(long, default_value_t = 20_000)]
    genes: usize,
    /// Threads for both sides.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[command(flatten)]
    protocol: ProtocolArgs,
    /// PyTorch baselines: plain (the package's model, default AdamW), tuned (the same
    /// shortcuts as scfm, fused AdamW, SDPA), compiled (tuned under torch.compile).
    #[arg(long, value_delimiter = ',', default_value = "plain,tuned,compiled")]
    baselines: Vec<String>,
    /// Python with torch (default: $SCFM_PYTHON or .venv/bin/python).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Arguments of `bench-embed`.
#[derive(clap::Args)]
pub(crate) struct BenchEmbedCli {
    /// Presets to measure (random-init weights over the data's genes).
    #[arg(long, value_delimiter = ',', default_value = "minimal,default")]
    presets: Vec<String>,
    /// Raw counts (.h5ad or any input `embed` reads).
    #[arg(long, default_value = "data/pbmc68k_counts.h5ad")]
    data: PathBuf,
    /// Cells per pass: the first N (the data repeated when it has fewer); default all.
    #[arg(long)]
    cells: Option<usize>,
    /// Cells per forward pass (as `embed`).
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Intra-op threads for both sides.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[command(flatten)]
    protocol: ProtocolArgs,
    /// Python with torch and anndata (default: $SCFM_PYTHON or .venv/bin/python).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Device (CPU only).
    #[arg(long, default_value = "cpu", value_parser = ["cpu"])]
    device: String,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Arguments of `bench-step`.
#[derive(clap::Args)]
pub(crate) struct BenchStepCli {
    /// Presets to measure.
    #[arg(long, value_delimiter = ',', default_value = "default,large")]
    presets: Vec<String>,
    /// cpu or cuda.
    #[arg(long, default_value = "cuda", value_parser = ["cpu", "cuda"])]
    device: String,
    /// Encoder compute precision (the matmul peak is measured in the same dtype).
    #[arg(long, default_value = "bf16", value_parser = ["fp32", "bf16"])]
    precision: String,
    /// Cells per step (two views each).
    #[arg(long, default_value_t = 16)]
    cells: usize,
    /// Tokens per sequence (default: the preset's max_seq_len).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Gene vocabulary size.
    #[arg(long, default_value_t = 20_000)]
    genes: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Cells of the loss-agreement batch (also run on the CPU in fp32).
    #[arg(long, default_value_t = 2)]
    agree_cells: usize,
    /// Size of the square matmul that measures the peak.
    #[arg(long, default_value_t = 8192)]
    matmul_n: i64,
    /// Intra-op CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Arguments of `nccl-check`.
#[derive(clap::Args)]
pub(crate) struct NcclCheckCli {
    /// Buffer size in MiB.
    #[arg(long, default_value_t = 256)]
    mb: usize,
    /// Timed all-reduces.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Arguments of `bench-allreduce`.
#[derive(clap::Args)]
pub(crate) struct BenchAllreduceCli {
    /// World sizes (one thread per rank in this process).
    #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
    world: Vec<usize>,
    /// Buffer sizes in MB.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    mb: Vec<usize>,
    /// Instead, time the ring over TLS against the plain ring (alternated over
    /// --rounds): the certificate chain (PEM) the accepting ranks present.
    #[arg(long, requires_all = ["ring_tls_key", "tls_ca"])]
    ring_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --ring-tls-cert.
    #[arg(long)]
    ring_tls_key: Option<PathBuf>,
    /// CA certificate (PEM) the connecting ranks verify --ring-tls-cert with.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Server name in --ring-tls-cert.
    #[arg(long, default_value = "localhost")]
    tls_domain: String,
    /// Rounds of the TLS comparison.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// `bench`: training steps/s of scfm against the PyTorch baselines, side by side.
pub(crate) fn bench(a: BenchCli) -> Result<()> {
    let BenchCli {
        presets,
        cells,
        seq_len,
        genes,
        threads,
        protocol,
        baselines,
        python,
        out,
    } = a;
    let repo = std::env::current_dir()?;
    let python = bench_python(python, &repo);
    for b in &baselines {
        anyhow::ensure!(
            ["plain", "tuned", "compiled"].contains(&b.as_str()),
            "--baselines: unknown baseline {b:?} (plain, tuned, compiled)"
        );
    }
    let args = scfm_worker::bench::BenchArgs {
        presets,
        cells,
        seq_len,
        genes,
        threads,
        protocol: protocol.protocol(),
        baselines,
        python,
        repo,
    };
    let results = scfm_worker::bench::run(&args)?;
    write_json(out.as_deref(), &results)?;
    Ok(())
}

/// `bench-embed`: embedding cells/s of scfm against scfm_torch, side by side.
pub(crate) fn bench_embed(a: BenchEmbedCli, rt: &Rt) -> Result<()> {
    let BenchEmbedCli {
        presets,
        data,
        cells,
        batch_size,
        threads,
        protocol,
        python,
        device: _,
        json,
    } = a;
    let repo = std::env::current_dir()?;
    let python = bench_python(python, &repo);
    let args = scfm_worker::bench_embed::EmbedBenchArgs {
        presets,
        data,
        cells,
        batch_size,
        threads,
        protocol: protocol.protocol(),
        python,
        repo,
    };
    let report = scfm_worker::bench_embed::run(&args, rt)?;
    write_json(json.as_deref(), &report)?;
    Ok(())
}

/// `bench-step`: training-step throughput and MFU of presets on one device.
pub(crate) fn bench_step(a: BenchStepCli) -> Result<()> {
    let BenchStepCli {
        presets,
        device,
        precision,
        cells,
        seq_len,
        genes,
        steps,
        warmup,
        agree_cells,
        matmul_n,
        threads,
        json,
    } = a;
    if let Some(t) = threads {
        tch::set_num_threads(t as i32);
    }
    let device = scfm_worker::step::select_device(device_choice(&device))?;
    let args = scfm_worker::bench_device::StepBenchArgs {
        presets,
        device,
        compute: (precision == "bf16").then_some(tch::Kind::BFloat16),
        cells,
        seq_len,
        genes,
        steps,
        warmup,
        agree_cells,
        matmul_n,
    };
    let report = scfm_worker::bench_device::run(&args)?;
    write_json(json.as_deref(), &report)?;
    Ok(())
}

/// `nccl-check`: a one-rank NCCL all-reduce on CUDA device 0, checked.
pub(crate) fn nccl_check(a: NcclCheckCli) -> Result<()> {
    let NcclCheckCli { mb, iters, json } = a;
    let r = scfm_worker::collective::nccl_check::run(mb, iters)?;
    println!(
        "nccl-check: {}; {} rank, {} MiB all-reduce: {:.3} ms, algbw {:.1} GB/s, busbw {:.1} GB/s (0 with one rank), values {}",
        r.library,
        r.world,
        r.bytes >> 20,
        r.seconds * 1e3,
        r.algbw_gbs,
        r.busbw_gbs,
        if r.values_ok { "ok" } else { "WRONG" }
    );
    write_json(json.as_deref(), &r)?;
    if !r.values_ok {
        anyhow::bail!("nccl-check: the all-reduce changed the values");
    }
    Ok(())
}

/// `bench-allreduce`: the ring's bus bandwidth, or with `--ring-tls-cert` its cost over TLS.
pub(crate) fn bench_allreduce(a: BenchAllreduceCli) -> Result<()> {
    match a {
        BenchAllreduceCli {
            world,
            mb,
            ring_tls_cert: Some(cert),
            ring_tls_key: Some(key),
            tls_ca: Some(ca),
            tls_domain,
            rounds,
        } => {
            let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("{}", p.display()));
            let tls = scfm_worker::collective::RingTls::from_pem(
                &read(&cert)?,
                &read(&key)?,
                &read(&ca)?,
                &tls_domain,
            )?;
            bench_tls_cost(&world, &mb, rounds, &tls)?;
        }
        BenchAllreduceCli { world, mb, .. } => {
            let sizes: Vec<usize> = mb.iter().map(|m| m << 20).collect();
            let rows = scfm_worker::collective::bench_bus_bandwidth(&world, &sizes);
            // Two bounds: one socket stream alone, and per stream with W streams at once.
            println!(
                "{:>5} {:>8} {:>10} {:>12} {:>12} {:>12} {:>12} {:>8} {:>8}",
                "ranks",
                "MB",
                "ms",
                "algbw GB/s",
                "busbw GB/s",
                "TCP1 GB/s",
                "TCPxW GB/s",
                "bus/TCP1",
                "bus/TCPxW"
            );
            for r in rows {
                if let Some(e) = r.error {
                    println!("{:>5} {:>8} failed: {e}", r.world_size, r.bytes >> 20);
                    continue;
                }
                println!(
                    "{:>5} {:>8} {:>10.2} {:>12.3} {:>12.3} {:>12.3} {:>12.3} {:>7.0}% {:>8.0}%",
                    r.world_size,
                    r.bytes >> 20,
                    r.seconds * 1e3,
                    r.algbw / 1e9,
                    r.busbw / 1e9,
                    r.tcp_bound / 1e9,
                    r.tcp_concurrent / 1e9,
                    100.0 * r.busbw / r.tcp_bound,
                    100.0 * r.busbw / r.tcp_concurrent
                );
            }
        }
    }
    Ok(())
}

/// `bench-allreduce` with TLS: for every world size and buffer size, the plain and the TLS
/// ring's time and bus bandwidth per round, then their medians and ratio.
fn bench_tls_cost(
    world: &[usize],
    mb: &[usize],
    rounds: usize,
    tls: &scfm_worker::collective::RingTls,
) -> Result<()> {
    let rounds = rounds.max(1);
    println!(
        "{:>5} {:>6} {:>6} {:>10} {:>10} {:>12} {:>12} {:>8}",
        "ranks", "MB", "round", "plain ms", "TLS ms", "plain GB/s", "TLS GB/s", "TLS/plain"
    );
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for &w in world {
        for &m in mb {
            let bytes = m << 20;
            let iterations = ((512usize << 20) / bytes.max(1)).clamp(3, 50);
            let r = scfm_worker::collective::bench_tls_cost(w, bytes, iterations, rounds, tls)
                .map_err(anyhow::Error::msg)?;
            let busbw = |s: f64| bytes as f64 / s * 2.0 * (w as f64 - 1.0) / w as f64 / 1e9;
            let row = |round: &str, p: f64, t: f64| {
                println!(
                    "{w:>5} {m:>6} {round:>6} {:>10.2} {:>10.2} {:>12.3} {:>12.3} {:>9.2}",
                    p * 1e3,
                    t * 1e3,
                    busbw(p),
                    busbw(t),
                    t / p
                )
            };
            for (i, x) in r.iter().enumerate() {
                row(&(i + 1).to_string(), x.plain, x.tls);
            }
            let p = median(r.iter().map(|x| x.plain).collect());
            let t = median(r.iter().map(|x| x.tls).collect());
            row("median", p, t);
        }
    }
    Ok(())
}

/// The Python of a side-by-side benchmark: `--python`, else `$SCFM_PYTHON`, else the
/// repository's `.venv/bin/python`.
fn bench_python(python: Option<PathBuf>, repo: &std::path::Path) -> PathBuf {
    python
        .or_else(|| std::env::var_os("SCFM_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| repo.join(".venv/bin/python"))
}

/// Writes a benchmark's results as pretty JSON when `out` is given.
fn write_json(out: Option<&std::path::Path>, value: &impl serde::Serialize) -> Result<()> {
    if let Some(out) = out {
        std::fs::write(out, serde_json::to_vec_pretty(value)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
