//! The raw-chunk reader's LZF decoder against liblzf's `lzf_decompress` (the C library
//! HDF5's `lzf` filter is built from, linked into every scfm binary through the `hdf5`
//! crate's `lzf` feature), on the same chunks: the compressed `X/data` and `X/indices`
//! chunks of the demo's prepared shards (byte-shuffled, LZF, as `scfm prepare` writes
//! them), read raw with h5py's `read_direct_chunk`.
//!
//! `cargo bench -p scfm-common --bench lzf` needs `data/mouse10k-prepared` (made by
//! `scripts/demo.sh`, or `scfm prepare data/mouse10k.h5ad --out data/mouse10k-prepared
//! --settings configs/prepare-demo.yaml`) and the venv's Python (`SCFM_PYTHON`). Both
//! decoders check every chunk's output against each other first; then, in rounds of
//! alternating order, each decodes all chunks `SCFM_BENCH_REPEAT` times (default 2,500: ≥ 10 s per side and round on a quiet machine);
//! it prints decoded MB/s per round, the medians with min–max and the ratio.

use std::os::raw::{c_uint, c_void};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use scfm_common::data::h5ad::lzf_decompress;

unsafe extern "C" {
    /// liblzf: decompresses `in_len` bytes into at most `out_len` bytes; returns the
    /// decompressed size, or 0 on error.
    #[link_name = "lzf_decompress"]
    fn c_lzf_decompress(
        in_data: *const c_void,
        in_len: c_uint,
        out_data: *mut c_void,
        out_len: c_uint,
    ) -> c_uint;
}

/// Dumps every raw chunk of `X/data` and `X/indices` of the shards as
/// `u32 n_compressed, u32 n_decoded, bytes…` records.
const DUMP: &str = r#"
import glob, struct, sys
import h5py
out = open(sys.argv[2], "wb")
for path in sorted(glob.glob(sys.argv[1] + "/shards/*.h5ad")):
    with h5py.File(path, "r") as f:
        for name in ("X/data", "X/indices"):
            d = f[name]
            assert d.compression == "lzf", (path, name, d.compression)
            n = d.chunks[0] * d.dtype.itemsize
            for i in range(0, d.shape[0], d.chunks[0]):
                mask, raw = d.id.read_direct_chunk((i,))
                out.write(struct.pack("<II", len(raw), n))
                out.write(raw)
"#;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo")
        .into()
}

fn chunks() -> Vec<(Vec<u8>, usize)> {
    let root = repo();
    let data = root.join("data/mouse10k-prepared");
    assert!(
        data.join("dataset.json").exists(),
        "{} is missing: run scripts/demo.sh (or `scfm prepare data/mouse10k.h5ad --out \
         data/mouse10k-prepared --settings configs/prepare-demo.yaml`)",
        data.display()
    );
    let dump = root.join(".cache/bench/lzf-chunks.bin");
    std::fs::create_dir_all(dump.parent().unwrap()).unwrap();
    let py = std::env::var("SCFM_PYTHON").unwrap_or_else(|_| "python3".into());
    let st = Command::new(&py)
        .args(["-c", DUMP])
        .arg(&data)
        .arg(&dump)
        .status()
        .unwrap_or_else(|e| panic!("{py}: {e}"));
    assert!(st.success(), "dumping the chunks with {py} failed");
    let bytes = std::fs::read(&dump).unwrap();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap()) as usize;
        let n = u32::from_le_bytes(bytes[i + 4..i + 8].try_into().unwrap()) as usize;
        out.push((bytes[i + 8..i + 8 + c].to_vec(), n));
        i += 8 + c;
    }
    out
}

fn liblzf(src: &[u8], n: usize, out: &mut Vec<u8>) -> bool {
    out.resize(n, 0);
    // SAFETY: `src` is valid for `src.len()` bytes and `out` for `n` writable bytes, the
    // lengths liblzf is given; it writes at most `out_len` bytes.
    let got = unsafe {
        c_lzf_decompress(
            src.as_ptr().cast(),
            src.len() as c_uint,
            out.as_mut_ptr().cast(),
            n as c_uint,
        )
    };
    got as usize == n
}

type Decoder = fn(&[u8], usize, &mut Vec<u8>) -> bool;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let chunks = chunks();
    let decoded: usize = chunks.iter().map(|c| c.1).sum();
    let compressed: usize = chunks.iter().map(|c| c.0.len()).sum();
    println!(
        "{} chunks: {:.1} MB decoded from {:.1} MB (ratio {:.2})",
        chunks.len(),
        decoded as f64 / 1e6,
        compressed as f64 / 1e6,
        decoded as f64 / compressed as f64
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (c, n) in &chunks {
        assert!(
            lzf_decompress(c, *n, &mut a),
            "scfm's decoder refused a chunk"
        );
        assert!(liblzf(c, *n, &mut b), "liblzf refused a chunk");
        assert_eq!(a, b, "the decoders disagree on a chunk");
    }
    let repeat: usize = std::env::var("SCFM_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2500);
    let rounds: usize = std::env::var("SCFM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let sides: [(&str, Decoder); 2] = [("scfm", lzf_decompress), ("liblzf", liblzf)];
    let mut rates = [Vec::new(), Vec::new()];
    let mut buf = Vec::new();
    // Warm-up: one pass each.
    for (_, f) in &sides {
        for (c, n) in &chunks {
            f(c, *n, &mut buf);
        }
    }
    for r in 0..rounds {
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut line = format!("round {r}:");
        for &s in &order {
            let (name, f) = sides[s];
            let t = Instant::now();
            for _ in 0..repeat {
                for (c, n) in &chunks {
                    assert!(f(c, *n, &mut buf));
                }
            }
            let mbs = (decoded * repeat) as f64 / 1e6 / t.elapsed().as_secs_f64();
            rates[s].push(mbs);
            line.push_str(&format!(" {name} {mbs:.0} MB/s"));
        }
        println!("{line}");
    }
    let lo_hi = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    let (sl, sh) = lo_hi(&rates[0]);
    let (ll, lh) = lo_hi(&rates[1]);
    let ms = median(&mut rates[0].clone());
    let ml = median(&mut rates[1].clone());
    println!("scfm:   median {ms:.0} MB/s (min {sl:.0}, max {sh:.0})");
    println!("liblzf: median {ml:.0} MB/s (min {ll:.0}, max {lh:.0})");
    println!("scfm / liblzf: {:.2}x", ms / ml);
}
