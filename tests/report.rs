//! `scfm report` on real runs: a 2-worker `scfm local` job and a single-process `scfm
//! train` run on the real demo dataset are plotted, and the page is opened in headless
//! Chromium (Debian's `chromium`, installed by scripts/setup.sh): it must load without a
//! console message, every image must load with a non-zero size, and the rendered page and
//! the loss plot must not be blank.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use scfm_tests::{TINY, bin, dataset, metric_steps, run_with_timeout, write_manifest};

/// The plots every report of a run with steps has.
const STEMS: [&str; 6] = ["loss", "lr", "grad_norm", "throughput", "timing", "workers"];

/// Runs `scfm report RUN --out OUT [extra]`; returns the page's text.
fn report(run: &Path, out: &Path, extra: &[&str]) -> String {
    let o = run_with_timeout(
        Command::new(bin("scfm"))
            .arg("report")
            .arg(run)
            .arg("--out")
            .arg(out)
            .args(extra),
        Duration::from_secs(120),
    );
    assert!(
        o.status.success(),
        "scfm report failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for stem in STEMS {
        for ext in ["png", "svg"] {
            let p = out.join(format!("{stem}.{ext}"));
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            assert!(
                len > 1000,
                "{} is missing or tiny ({len} bytes)",
                p.display()
            );
        }
        let svg = std::fs::read_to_string(out.join(format!("{stem}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));
    }
    std::fs::read_to_string(out.join("index.html")).expect("index.html")
}

/// The lines `scfm metrics RUN` prints.
fn scfm_metrics(run: &Path) -> Vec<serde_json::Value> {
    let o = run_with_timeout(
        Command::new(bin("scfm")).arg("metrics").arg(run),
        Duration::from_secs(60),
    );
    assert!(
        o.status.success(),
        "scfm metrics failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Pixels of a PNG as RGB, with its size.
fn rgb_pixels(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec.read_info().expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("PNG data");
    let ch = info.color_type.samples();
    let px = buf[..info.buffer_size()]
        .chunks_exact(ch)
        .map(|c| match ch {
            1 | 2 => [c[0]; 3],
            _ => [c[0], c[1], c[2]],
        })
        .collect();
    (info.width, info.height, px)
}

/// Asserts that the PNG at `path` is a picture, not a blank canvas: its luminance varies
/// and more than `min_ink` of it differs from the most common (background) colour.
fn assert_not_blank(path: &Path, min_ink: f64) {
    let (w, h, px) = rgb_pixels(path);
    assert!(w > 100 && h > 100, "{}: {w}x{h}", path.display());
    let lum: Vec<f64> = px
        .iter()
        .map(|p| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64)
        .collect();
    let mean = lum.iter().sum::<f64>() / lum.len() as f64;
    let var = lum.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / lum.len() as f64;
    let mut counts = std::collections::HashMap::new();
    for p in &px {
        *counts.entry(*p).or_insert(0usize) += 1;
    }
    let background = counts.values().max().copied().unwrap_or(0);
    let ink = 1.0 - background as f64 / px.len() as f64;
    eprintln!(
        "{}: {w}x{h}, luminance variance {var:.1}, {} colours, {:.2} % ink",
        path.display(),
        counts.len(),
        100.0 * ink
    );
    assert!(var > 20.0, "{} is blank (variance {var})", path.display());
    assert!(counts.len() > 8, "{} has too few colours", path.display());
    assert!(ink > min_ink, "{} is nearly empty ({ink})", path.display());
}

/// Debian's chromium (or `SCFM_CHROMIUM`), if installed.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SCFM_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n)))
    .find(|p| p.is_file())
}

/// Runs headless chromium on `page` with `args`; returns (stdout, console lines).
fn headless(chrome: &Path, profile: &Path, page: &Path, args: &[String]) -> (String, Vec<String>) {
    let o = run_with_timeout(
        Command::new(chrome)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
            ])
            .args([
                "--no-first-run",
                "--disable-extensions",
                "--enable-logging=stderr",
            ])
            .args(["--v=0", "--virtual-time-budget=10000"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(format!("file://{}", page.display())),
        Duration::from_secs(120),
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "chromium failed:\n{err}");
    // Every message of the page's console (errors, warnings, logs) is logged as
    // `...:CONSOLE:<line>] "message", source: ...`; the page has no scripts, so none
    // is expected.
    let console = err
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect();
    (String::from_utf8_lossy(&o.stdout).to_string(), console)
}

/// Records load errors and every image's state into the DOM once the page has loaded.
const PROBE: &str = r#"<script>
window.__scfmErrors = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  window.__scfmErrors.push(t && t !== window && (t.src || t.href) ? 'failed to load ' + (t.src || t.href) : 'error: ' + e.message);
}, true);
window.addEventListener('load', function () {
  var r = {errors: window.__scfmErrors, images: Array.prototype.map.call(document.images, function (i) {
    return {src: i.getAttribute('src'), complete: i.complete, w: i.naturalWidth, h: i.naturalHeight};
  })};
  var p = document.createElement('pre');
  p.textContent = 'SCFM_CHECK' + JSON.stringify(r) + 'SCFM_END';
  document.body.appendChild(p);
});
</script>"#;

/// Opens `out/index.html` in headless chromium: no console message, every `<img>` loaded
/// with a non-zero natural size, and a screenshot of the page that is not blank.
/// Skips (loudly) only when chromium is not installed.
fn check_in_browser(out: &Path, n_images: usize) {
    let Some(chrome) = chromium() else {
        scfm_tests::skip(
            "report-browser",
            "chromium not found (apt-get install chromium; scripts/setup.sh does)",
        );
        return;
    };
    let profile = tempfile::tempdir().unwrap();
    // 1. The page as written: rendered to a screenshot, its console must stay silent.
    let shot = out.join("screenshot.png");
    let (_, console) = headless(
        &chrome,
        profile.path(),
        &out.join("index.html"),
        &[
            "--window-size=1280,2400".into(),
            format!("--screenshot={}", shot.display()),
        ],
    );
    assert!(
        console.is_empty(),
        "console messages:\n{}",
        console.join("\n")
    );
    assert_not_blank(&shot, 0.02);
    // 2. The same page with a probe in <head> (same folder, so the relative sources are
    //    the same): load errors and the images' natural sizes, read from the DOM.
    let index = std::fs::read_to_string(out.join("index.html")).unwrap();
    let probed = out.join("probe.html");
    std::fs::write(
        &probed,
        index.replacen("<head>", &format!("<head>\n{PROBE}"), 1),
    )
    .unwrap();
    let (dom, console) = headless(&chrome, profile.path(), &probed, &["--dump-dom".into()]);
    assert!(
        console.is_empty(),
        "console messages:\n{}",
        console.join("\n")
    );
    let json = dom
        .rsplit_once("SCFM_CHECK")
        .and_then(|(_, r)| r.split_once("SCFM_END"))
        .map(|(j, _)| j)
        .unwrap_or_else(|| panic!("the probe did not run; DOM:\n{dom}"));
    let r: serde_json::Value = serde_json::from_str(json).expect("probe JSON");
    assert_eq!(r["errors"], serde_json::json!([]), "load errors: {r}");
    let images = r["images"].as_array().unwrap();
    assert_eq!(images.len(), n_images, "{r}");
    for i in images {
        assert!(
            i["complete"] == true && i["w"].as_u64() > Some(0) && i["h"].as_u64() > Some(0),
            "image not loaded: {i}"
        );
    }
    eprintln!(
        "chromium: {} images loaded, no console message",
        images.len()
    );
}

#[test]
fn report_of_a_two_worker_run_renders_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let training = "  seed: 4\n  batch_size: 8\n  max_steps: 24\n  lr: 0.003\n  warmup_steps: 4\n  eval_every: 8\n  log_every: 8\n  threads: 1";
    let m = write_manifest(dir.path(), &ckpt, TINY, training, "  max_workers: 2");
    // Checkpoints every 8 steps, so the loss plot marks several.
    let text = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, text.replace("every_steps: 1000", "every_steps: 8")).unwrap();
    let o = run_with_timeout(
        Command::new(bin("scfm"))
            .arg("local")
            .arg(&m)
            .args(["--workers", "2"])
            .env("RUST_BACKTRACE", "0"),
        Duration::from_secs(600),
    );
    assert!(
        o.status.success(),
        "scfm local failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // An evaluation file in the lead's generic shape, made from this run's own numbers.
    let lines = metric_steps(&ckpt);
    assert_eq!(
        scfm_metrics(&ckpt),
        lines,
        "`scfm metrics` prints the log's lines"
    );
    let steps: BTreeSet<u64> = lines
        .iter()
        .filter(|l| l["event"] == "step")
        .filter_map(|l| l["step"].as_u64())
        .collect();
    let last = lines.iter().rfind(|l| l["event"] == "step").unwrap();
    let eval = dir.path().join("evaluation.json");
    let doc = serde_json::json!({"rows": [
        {"embedding": "scfm-test", "final_mgem": last["mgem"], "steps": steps.len()},
        {"embedding": "<baseline>", "final_mgem": null}
    ]});
    std::fs::write(&eval, doc.to_string()).unwrap();
    let out = dir.path().join("report");
    let page = report(&ckpt, &out, &["--eval", eval.to_str().unwrap()]);
    assert!(page.contains(&format!(
        "{} logged, steps 1–{}",
        steps.len(),
        steps.last().unwrap()
    )));
    assert!(
        page.contains("at most 2; generations that trained"),
        "two workers"
    );
    let stored: BTreeSet<u64> = std::fs::read_dir(&ckpt)
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("ckpt-")?
                .parse()
                .ok()
        })
        .collect();
    assert!(stored.contains(&24), "the last checkpoint: {stored:?}");
    let list: Vec<String> = stored.iter().map(u64::to_string).collect();
    let row = format!("{} stored, at steps {}", stored.len(), list.join(", "));
    assert!(page.contains(&row), "checkpoints listed as {row}");
    assert!(page.contains("<td>scfm-test</td>") && page.contains("<td>&lt;baseline&gt;</td>"));
    assert!(
        page.contains("state.json"),
        "the newest checkpoint's settings are shown"
    );
    assert_not_blank(&out.join("loss.png"), 0.01);
    check_in_browser(&out, STEMS.len());
}

#[test]
fn report_of_a_single_process_run() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let cfg = format!(
        "data:\n  path: {}\n  validation_fraction: 0.05\nmodel:\n{TINY}\ntraining:\n  seed: 2\n  batch_size: 8\n  max_steps: 12\n  eval_every: 6\n  threads: 1\ncheckpoint:\n  url: {}\n  every_steps: 6\n",
        dataset("mouse10k.h5ad").display(),
        ckpt.display()
    );
    let cfg_path = dir.path().join("train.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let o = run_with_timeout(
        Command::new(bin("scfm"))
            .args(["train", "--config"])
            .arg(&cfg_path),
        Duration::from_secs(600),
    );
    assert!(
        o.status.success(),
        "scfm train failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(
        ckpt.join("evaluation.md"),
        "| embedding | ARI |\n|---|---|\n| x | 1 |\n",
    )
    .unwrap();
    // `scfm metrics` prints the log; a single process writes the cluster's schema.
    let printed = scfm_metrics(&ckpt);
    let steps: Vec<&serde_json::Value> = printed.iter().filter(|l| l["event"] == "step").collect();
    assert_eq!(steps.len(), 12);
    for k in [
        "offset",
        "step_cells",
        "rank",
        "world_size",
        "step_s",
        "compute_s",
        "total_steps",
    ] {
        assert!(steps[11].get(k).is_some(), "no `{k}` in {}", steps[11]);
    }
    assert_eq!(
        (
            steps[11]["world_size"].as_u64(),
            steps[11]["step_cells"].as_u64()
        ),
        (Some(1), Some(8))
    );
    assert!(printed.iter().any(|l| l["event"] == "eval"));
    let out = dir.path().join("report");
    let page = report(&ckpt, &out, &[]);
    assert!(page.contains("12 logged, steps 1–12"), "{page}");
    assert!(
        page.contains("Best validation loss"),
        "eval events are read"
    );
    assert!(
        page.contains("| embedding | ARI |"),
        "evaluation.md shown verbatim"
    );
    assert_not_blank(&out.join("loss.png"), 0.01);
    check_in_browser(&out, STEMS.len());
}

#[test]
fn report_errors_name_the_run_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = |target: &Path| {
        run_with_timeout(
            Command::new(bin("scfm"))
                .arg("report")
                .arg(target)
                .arg("--out")
                .arg(dir.path().join("out")),
            Duration::from_secs(60),
        )
    };
    let missing = dir.path().join("no-such-run");
    let o = run(&missing);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no-such-run"), "{err}");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = run(&empty);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("has no metrics log"),
        "{err}"
    );
    assert!(err.contains(&empty.display().to_string()), "{err}");
    std::fs::write(
        empty.join("metrics.jsonl"),
        "{\"event\":\"step\",\"step\":1,\"loss\":1.0}\n{\"event\":\"step\",\n",
    )
    .unwrap();
    let o = run(&empty);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("metrics.jsonl line 2"),
        "{err}"
    );
}
