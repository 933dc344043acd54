//! `scfm-worker bench-embed`: embedding throughput (cells/s) of scfm's [`Embedder`] — the
//! code path of `scfm embed` minus file I/O: gene alignment, normalisation,
//! `tokenize_inference`, forward, pooling, L2 norm — next to `scfm_torch.embed` (the
//! PyTorch package in `python/`) on the same cells, the same weights and the same number
//! of intra-op threads.
//!
//! Per preset a seeded random-init model over the data's genes is written as an export
//! folder; the Rust side loads it through [`ModelBundle::load`], a single
//! `benches/torch_embed.py` process through `scfm_torch.load`. That process loads model
//! and cells once and then serves requests over stdin/stdout, so both sides stay warm.
//! One pass over all cells per side first checks that the two sides' embeddings agree
//! within [`MAX_ABS_DIFF`]; then the sides are timed with the benchmark protocol
//! ([`crate::bench_protocol`]): the same untimed warm-up, rounds of whole passes lasting at
//! least the round length, the order alternating every round, medians with min–max, the
//! load recorded, and no ratio where a side's spread is beyond the bound.
//!
//! The hardware bound: [`forward_flops`] per cell against the fp32 matmul peak of this
//! machine at the same thread count ([`matmul_peak_gflops`]).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use scfm_common::config::{ExpressionEncoding, ModelConfig};
use scfm_common::data::CsrMatrix;
use scfm_common::data::prepared::VocabEntry;
use scfm_common::runtime::Rt;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::bench_protocol::{self, Contender, Measured, Protocol, Rates, run_for};
use crate::checkpoint::safetensors_to_vecs;
use crate::error::{Result, WorkerError};
use crate::infer::export::write_export;
use crate::infer::input::{BLOCK_ROWS, CellInput, InputOptions};
use crate::infer::load::ModelBundle;
use crate::infer::{Embedder, align};

/// Largest max-abs difference between the two sides' embeddings that counts as the same
/// computation.
pub const MAX_ABS_DIFF: f64 = 1e-4;
/// Side of the square fp32 matmul timed for the machine's peak.
pub const PEAK_MATMUL_N: i64 = 2048;
/// Seed of the random-init models.
const SEED: u64 = 0;

/// Settings of `bench-embed`.
#[derive(Debug, Clone)]
pub struct EmbedBenchArgs {
    /// Presets to measure.
    pub presets: Vec<String>,
    /// An `.h5ad` (or any input `scfm embed` reads) of raw counts.
    pub data: PathBuf,
    /// Cells per pass: the first N of the data, repeated when it has fewer (all if `None`).
    pub cells: Option<usize>,
    /// Cells per forward pass.
    pub batch_size: usize,
    /// Intra-op threads of both sides.
    pub threads: usize,
    /// Rounds, their length, the warm-up and the spread bound.
    pub protocol: Protocol,
    /// Python interpreter with torch and anndata.
    pub python: PathBuf,
    /// Repository root (for `benches/torch_embed.py` and `python/`).
    pub repo: PathBuf,
}

/// One preset's result.
#[derive(Debug, Clone, Serialize)]
pub struct EmbedBenchResult {
    /// Preset.
    pub preset: String,
    /// Parameters of the model.
    pub params: usize,
    /// Cells per pass.
    pub cells: usize,
    /// Mean tokens per cell (`[CLS]` included, padding not).
    pub mean_tokens: f64,
    /// Mean forward FLOPs per cell ([`forward_flops`] of each cell's token count).
    pub flops_per_cell: f64,
    /// scfm cells/s per round, with median and min–max.
    pub scfm: Rates,
    /// scfm_torch cells/s per round, with median and min–max.
    pub torch: Rates,
    /// median(scfm) / median(torch), or why it is not given (a spread beyond the bound).
    pub ratio: std::result::Result<f64, String>,
    /// Load averages (1, 5, 15 min) before and after the timed rounds.
    pub load: (Option<[f64; 3]>, Option<[f64; 3]>),
    /// Max absolute difference between the two sides' embeddings.
    pub max_abs_diff: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct EmbedBenchReport {
    /// Intra-op threads of both sides.
    pub threads: usize,
    /// Cells per forward pass.
    pub batch_size: usize,
    /// Measured fp32 matmul peak (GFLOP/s) at `threads`.
    pub peak_gflops: f64,
    /// The torch version of the Python side.
    pub torch_version: String,
    /// Per preset.
    pub results: Vec<EmbedBenchResult>,
}

/// Analytic forward FLOPs of one cell of `tokens` tokens (multiply-add = 2 FLOPs):
///
/// ```text
/// n_layers * (2*T*(4*H^2 + 2*H*F)      qkv (3H^2) + attention out (H^2) + FFN fc1, fc2 (H*F each)
///             + 4*T^2*H)               Q K^T and attention x V
/// + 2*T*(H + H^2)                      continuous expression MLP (fc1 1->H, fc2 H->H); 0 if binned
/// ```
///
/// with `T = tokens`, `H = hidden`, `F = ffn_dim`. Embedding lookups, LayerNorms, GELU,
/// softmax, pooling and the L2 norm are O(T*H) and left out.
pub fn forward_flops(cfg: &ModelConfig, tokens: usize) -> f64 {
    let (t, h, f) = (tokens as f64, cfg.hidden as f64, cfg.ffn_dim as f64);
    let layer = 2.0 * t * (4.0 * h * h + 2.0 * h * f) + 4.0 * t * t * h;
    let expr = match cfg.expression {
        ExpressionEncoding::Continuous => 2.0 * t * (h + h * h),
        ExpressionEncoding::Binned => 0.0,
    };
    cfg.n_layers as f64 * layer + expr
}

/// The best GFLOP/s of a warm `n x n` fp32 matmul on the CPU at the current thread count.
pub fn matmul_peak_gflops(n: i64) -> f64 {
    let a = Tensor::randn([n, n], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([n, n], (Kind::Float, Device::Cpu));
    tch::no_grad(|| {
        for _ in 0..2 {
            let _ = a.mm(&b);
        }
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let _ = a.mm(&b);
                2.0 * (n as f64).powi(3) / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    })
}

fn internal(what: impl std::fmt::Display, e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Internal(format!("{what}: {e}"))
}

/// All cells of `data` in memory (the file is read once, outside any timing).
fn read_counts(data: &Path, rt: &Rt) -> Result<(CsrMatrix, Vec<String>)> {
    let input = CellInput::open(&data.to_string_lossy(), &InputOptions::default(), rt)?;
    let n_cols = input.var_names.len();
    let mut all = CsrMatrix {
        n_rows: 0,
        n_cols,
        indptr: vec![0],
        indices: Vec::new(),
        data: Vec::new(),
    };
    input.for_each_block(BLOCK_ROWS, |_, x| {
        let base = all.data.len() as u64;
        all.indptr.extend(x.indptr[1..].iter().map(|p| base + p));
        all.indices.extend_from_slice(&x.indices);
        all.data.extend_from_slice(&x.data);
        all.n_rows += x.n_rows;
        Ok(())
    })?;
    Ok((all, input.var_names))
}

/// One pass of `scfm embed` over in-memory count blocks: unit embeddings `[n, hidden]`.
fn scfm_pass(
    b: &ModelBundle,
    genes: &[String],
    blocks: &[CsrMatrix],
    bs: usize,
) -> Result<Vec<f32>> {
    let a = align(genes, &b.vocab);
    let emb = Embedder::new(b, bs);
    let mut out = Vec::new();
    for counts in blocks {
        out.extend(emb.embed(&emb.model_rows(counts, &a))?);
    }
    Ok(out)
}

/// The `benches/torch_embed.py` process of one preset.
struct TorchSide {
    child: Child,
    stdin: ChildStdin,
    /// The script's stdout lines, read on a thread so that a wait has a deadline.
    lines: std::sync::mpsc::Receiver<std::io::Result<String>>,
}

/// The longest wait for one reply of `benches/torch_embed.py` (one timed pass of the
/// largest preset takes about a minute on two cores).
const REPLY_DEADLINE: Duration = Duration::from_secs(1800);

/// Sends each line of `out` (then the end) into a channel.
fn spawn_line_reader(out: ChildStdout) -> std::sync::mpsc::Receiver<std::io::Result<String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let failed = line.is_err();
            if tx.send(line).is_err() || failed {
                return;
            }
        }
    });
    rx
}

impl TorchSide {
    fn start(args: &EmbedBenchArgs, model: &Path) -> Result<(Self, serde_json::Value)> {
        let script = args.repo.join("benches/torch_embed.py");
        let mut cmd = Command::new(&args.python);
        cmd.arg(&script)
            .arg("--model")
            .arg(model)
            .arg("--data")
            .arg(&args.data)
            .args(["--batch-size", &args.batch_size.to_string()])
            .args(["--threads", &args.threads.to_string()]);
        if let Some(n) = args.cells {
            cmd.args(["--cells", &n.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| internal(format!("starting {}", args.python.display()), e))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(WorkerError::Internal("python pipes not captured".into()));
        };
        let mut side = TorchSide {
            child,
            stdin,
            lines: spawn_line_reader(stdout),
        };
        let ready = side.reply()?;
        Ok((side, ready))
    }

    /// The next JSON object on the script's stdout (other lines go to stderr).
    fn reply(&mut self) -> Result<serde_json::Value> {
        loop {
            let line = match self.lines.recv_timeout(REPLY_DEADLINE) {
                Ok(line) => line.map_err(|e| internal("torch_embed.py stdout", e))?,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    return Err(WorkerError::Internal(format!(
                        "benches/torch_embed.py sent nothing for {} s",
                        REPLY_DEADLINE.as_secs()
                    )));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self
                        .child
                        .wait()
                        .map_err(|e| internal("torch_embed.py", e))?;
                    return Err(WorkerError::Internal(format!(
                        "benches/torch_embed.py exited ({status}); its error is on stderr above"
                    )));
                }
            };
            match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) if v.is_object() => return Ok(v),
                _ => eprintln!("torch_embed.py: {line}"),
            }
        }
    }

    /// Sends `cmd` and returns the reply.
    fn request(&mut self, cmd: &str) -> Result<serde_json::Value> {
        writeln!(self.stdin, "{cmd}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| internal("torch_embed.py stdin", e))?;
        self.reply()
    }
}

impl Drop for TorchSide {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit").and_then(|_| self.stdin.flush());
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The scfm side: whole passes of [`scfm_pass`] over the cells, after one warm-up batch.
struct ScfmSide<'a> {
    bundle: &'a ModelBundle,
    genes: &'a [String],
    blocks: &'a [CsrMatrix],
    warm: &'a [CsrMatrix],
    batch_size: usize,
    cells: usize,
}

impl ScfmSide<'_> {
    fn pass(&self, blocks: &[CsrMatrix]) -> Result<()> {
        scfm_pass(self.bundle, self.genes, blocks, self.batch_size).map(|_| ())
    }

    /// Whole passes over all cells for at least `seconds`: (cells, seconds), or the first
    /// error.
    fn passes_for(&self, seconds: f64) -> Result<(u64, f64)> {
        let mut r = Ok(());
        let (passes, dt) = run_for(seconds, || {
            if r.is_ok() {
                r = self.pass(self.blocks);
            }
        });
        r.map(|_| (passes * self.cells as u64, dt))
    }
}

impl Contender for ScfmSide<'_> {
    fn name(&self) -> &str {
        "scfm"
    }

    fn warm(&mut self, seconds: f64) -> Result<()> {
        self.passes_for(seconds).map(|_| ())
    }

    fn round(&mut self, seconds: f64) -> Result<(u64, f64)> {
        self.pass(self.warm)?;
        self.passes_for(seconds)
    }
}

/// The scfm_torch side: the same passes in `benches/torch_embed.py`.
struct TorchContender<'a>(&'a mut TorchSide);

impl TorchContender<'_> {
    /// `(cells, seconds)` of a `warm S` or `for S` request.
    fn timed(&mut self, cmd: &str) -> Result<(u64, f64)> {
        let r = self.0.request(cmd)?;
        match (r["cells"].as_u64(), r["seconds"].as_f64()) {
            (Some(c), Some(s)) => Ok((c, s)),
            _ => Err(WorkerError::Internal(format!("torch_embed.py replied {r}"))),
        }
    }
}

impl Contender for TorchContender<'_> {
    fn name(&self) -> &str {
        "scfm_torch"
    }

    fn warm(&mut self, seconds: f64) -> Result<()> {
        self.timed(&format!("warm {seconds}")).map(|_| ())
    }

    fn round(&mut self, seconds: f64) -> Result<(u64, f64)> {
        self.timed(&format!("for {seconds}"))
    }
}

/// Max |a - b| (infinite when the lengths differ or a value is NaN).
fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter().zip(b).fold(0.0, |m: f64, (x, y)| {
        let d = (*x as f64 - *y as f64).abs();
        if d.is_nan() { f64::INFINITY } else { m.max(d) }
    })
}

/// Runs the benchmark (reading its input on `rt`), prints the markdown table on stdout
/// and returns the results.
pub fn run(args: &EmbedBenchArgs, rt: &Rt) -> Result<EmbedBenchReport> {
    let bad = |m: &str| Err(WorkerError::Data(format!("bench-embed: {m}")));
    if args.threads == 0
        || args.protocol.rounds == 0
        || args.batch_size == 0
        || args.cells == Some(0)
    {
        return bad("--threads, --rounds, --batch-size and --cells must be at least 1");
    }
    args.protocol.validate()?;
    let cfgs = args
        .presets
        .iter()
        .map(|p| Ok((p.clone(), ModelConfig::preset(p)?)))
        .collect::<Result<Vec<_>>>()?;
    tch::set_num_threads(args.threads as i32);
    let (all, genes) = read_counts(&args.data, rt)?;
    if all.n_rows == 0 {
        return bad(&format!("{} holds no cells", args.data.display()));
    }
    let n = args.cells.unwrap_or(all.n_rows);
    let counts = all.select_rows(&(0..n).map(|i| i % all.n_rows).collect::<Vec<_>>());
    let blocks: Vec<CsrMatrix> = (0..n)
        .step_by(BLOCK_ROWS)
        .map(|a| counts.select_rows(&(a..(a + BLOCK_ROWS).min(n)).collect::<Vec<_>>()))
        .collect();
    let warm = [counts.select_rows(&(0..args.batch_size.min(n)).collect::<Vec<_>>())];
    let mut seen = std::collections::HashSet::new();
    let vocab: Vec<VocabEntry> = genes
        .iter()
        .filter(|g| seen.insert(g.as_str()))
        .map(|g| VocabEntry {
            gene_id: g.clone(),
            symbol: g.clone(),
        })
        .collect();
    let peak = matmul_peak_gflops(PEAK_MATMUL_N);
    eprintln!(
        "bench-embed: {n} cells of {} ({} genes), batch {}, {} threads; fp32 matmul peak {peak:.1} GFLOP/s",
        args.data.display(),
        vocab.len(),
        args.batch_size,
        args.threads
    );
    let mut report = EmbedBenchReport {
        threads: args.threads,
        batch_size: args.batch_size,
        peak_gflops: peak,
        torch_version: String::new(),
        results: Vec::new(),
    };
    for (preset, cfg) in cfgs {
        let dir = tempfile::tempdir().map_err(|e| internal("temporary directory", e))?;
        let random = ModelBundle::random_init(&cfg, vocab.clone(), 1e4, Device::Cpu, SEED)?;
        write_export(&random, dir.path(), None, rt)?;
        drop(random);
        let bundle = ModelBundle::load(&dir.path().to_string_lossy(), Device::Cpu, None, rt)?;
        let params: usize = bundle.vs.variables().values().map(|t| t.numel()).sum();
        let emb = Embedder::new(&bundle, args.batch_size);
        let a = align(&genes, &bundle.vocab);
        let lens: Vec<usize> = blocks
            .iter()
            .flat_map(|b| emb.tokens(&emb.model_rows(b, &a)))
            .map(|t| t.genes.len())
            .collect();
        let mean_tokens = lens.iter().sum::<usize>() as f64 / n as f64;
        let flops_per_cell = lens.iter().map(|&t| forward_flops(&cfg, t)).sum::<f64>() / n as f64;
        let (mut torch, ready) = TorchSide::start(args, dir.path())?;
        if ready["cells"].as_u64() != Some(n as u64) {
            return Err(WorkerError::Internal(format!(
                "torch_embed.py read {} cells, scfm {n}",
                ready["cells"]
            )));
        }
        report.torch_version = ready["torch"].as_str().unwrap_or("?").to_string();
        eprintln!(
            "{preset}: {params} parameters, {mean_tokens:.1} tokens/cell, {:.3} GFLOP/cell; torch {} with {} threads",
            flops_per_cell / 1e9,
            report.torch_version,
            ready["threads"]
        );
        // The same computation first: one pass each, embeddings compared.
        let check = dir.path().join("torch_embeddings.safetensors");
        let rust_out = scfm_pass(&bundle, &genes, &blocks, args.batch_size)?;
        torch.request(&format!("run {}", check.display()))?;
        let bytes = std::fs::read(&check).map_err(|e| internal(check.display(), e))?;
        let named = safetensors_to_vecs(&bytes, &check.display().to_string())?;
        let (shape, py) = named.get("embeddings").ok_or_else(|| {
            WorkerError::Internal(format!("{}: no `embeddings`", check.display()))
        })?;
        let diff = if shape[..] == [n, cfg.cell_dim()] {
            max_abs_diff(&rust_out, py)
        } else {
            f64::INFINITY
        };
        eprintln!("{preset}: max |scfm - scfm_torch| over the embeddings = {diff:.3e}");
        if diff.is_nan() || diff > MAX_ABS_DIFF {
            return Err(WorkerError::Internal(format!(
                "{preset}: scfm and scfm_torch embeddings differ by {diff:.3e} (> {MAX_ABS_DIFF:e}): the two sides do not compute the same thing, the timings are not comparable"
            )));
        }
        let measured: Measured = {
            let mut sides: Vec<Box<dyn Contender + '_>> = vec![
                Box::new(ScfmSide {
                    bundle: &bundle,
                    genes: &genes,
                    blocks: &blocks,
                    warm: &warm,
                    batch_size: args.batch_size,
                    cells: n,
                }),
                Box::new(TorchContender(&mut torch)),
            ];
            bench_protocol::measure(&args.protocol, &mut sides)?
        };
        let [ours, theirs] = [&measured.sides[0], &measured.sides[1]];
        let ratio = bench_protocol::ratio(ours, theirs, args.protocol.max_spread);
        drop(torch);
        report.results.push(EmbedBenchResult {
            preset,
            params,
            cells: n,
            mean_tokens,
            flops_per_cell,
            scfm: ours.clone(),
            torch: theirs.clone(),
            ratio,
            load: (measured.load_before, measured.load_after),
            max_abs_diff: diff,
        });
    }
    print!("{}", markdown(&report));
    Ok(report)
}

/// The report as a markdown table plus the hardware-bound lines.
pub fn markdown(r: &EmbedBenchReport) -> String {
    let mut s = format!(
        "CPU, {} threads, batch {}, torch {}; cells/s: median (min–max) over rounds \
         (both sides warm, order alternating, whole passes over the cells per round)\n\n\
         | preset | params | cells | tokens/cell | GFLOP/cell | scfm cells/s | torch cells/s | scfm/torch | scfm GFLOP/s (% peak) | torch GFLOP/s (% peak) | max abs diff |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        r.threads, r.batch_size, r.torch_version
    );
    let cps = |v: &Rates| format!("{:.1} ({:.1}–{:.1})", v.median, v.min, v.max);
    for x in &r.results {
        let g = |v: &Rates| v.median * x.flops_per_cell / 1e9;
        let (gs, gt) = (g(&x.scfm), g(&x.torch));
        let ratio = match &x.ratio {
            Ok(q) => format!("{q:.2}x"),
            Err(why) => why.clone(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.4} | {} | {} | {ratio} | {gs:.1} ({:.0}%) | {gt:.1} ({:.0}%) | {:.1e} |\n",
            x.preset,
            x.params,
            x.cells,
            x.mean_tokens,
            x.flops_per_cell / 1e9,
            cps(&x.scfm),
            cps(&x.torch),
            100.0 * gs / r.peak_gflops,
            100.0 * gt / r.peak_gflops,
            x.max_abs_diff
        ));
    }
    s.push_str(&format!(
        "\nHardware bound: fp32 matmul peak {:.1} GFLOP/s ({PEAK_MATMUL_N}x{PEAK_MATMUL_N}, {} threads, best of 5 warm).\n\
         FLOPs/cell = mean over cells of n_layers*(2T(4H^2+2HF) + 4T^2H) + 2T(H+H^2) (T = the cell's tokens; padding and O(T*H) ops not counted).\n",
        r.peak_gflops, r.threads
    ));
    for x in &r.results {
        let load = |l: Option<[f64; 3]>| l.map_or("?".into(), |l| format!("{:.2}", l[0]));
        s.push_str(&format!(
            "- {}: per round scfm {:?}, scfm_torch {:?} cells/s; load average {} before, {} after\n",
            x.preset,
            x.scfm.rounds.iter().map(|v| (v * 10.0).round() / 10.0).collect::<Vec<_>>(),
            x.torch.rounds.iter().map(|v| (v * 10.0).round() / 10.0).collect::<Vec<_>>(),
            load(x.load.0),
            load(x.load.1)
        ));
        s.push_str(&format!(
            "- {}: at 100% of peak {:.0} cells/s; scfm reaches {:.1}%, torch {:.1}%\n",
            x.preset,
            r.peak_gflops * 1e9 / x.flops_per_cell,
            100.0 * x.scfm.median * x.flops_per_cell / 1e9 / r.peak_gflops,
            100.0 * x.torch.median * x.flops_per_cell / 1e9 / r.peak_gflops
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_flops_match_hand_count() {
        let mut cfg = ModelConfig::preset("minimal").unwrap();
        (cfg.hidden, cfg.ffn_dim, cfg.n_layers) = (128, 512, 2);
        cfg.expression = ExpressionEncoding::Binned;
        // Per layer: 2*100*(4*128^2 + 2*128*512) = 39_321_600, 4*100^2*128 = 5_120_000.
        assert_eq!(forward_flops(&cfg, 100), 2.0 * (39_321_600.0 + 5_120_000.0));
        // Continuous expression adds 2*100*(128 + 128^2) = 3_302_400.
        cfg.expression = ExpressionEncoding::Continuous;
        assert_eq!(forward_flops(&cfg, 100), 92_185_600.0);
        assert_eq!(forward_flops(&cfg, 0), 0.0);
    }

    #[test]
    fn median_and_diff() {
        assert_eq!(Rates::new("r", vec![3.0, 1.0, 2.0]).median, 2.0);
        assert_eq!(Rates::new("r", vec![4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
        assert!(max_abs_diff(&[1.0], &[f32::NAN]).is_infinite());
        assert!(max_abs_diff(&[1.0], &[]).is_infinite());
    }
}
