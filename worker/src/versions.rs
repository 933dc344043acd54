//! `scfm-worker versions`: what this worker was built against and what it runs on — the
//! libtorch versions (compiled and loaded), CUDA, and where NCCL is looked for and what
//! loaded. It runs even when the libtorch check fails, to show why.

use serde_json::{Value, json};

use crate::collective::nccl_lib::{Candidate, process_candidates};
use crate::libtorch;

/// The report as JSON.
pub fn report() -> Value {
    let lt = libtorch::loaded();
    let check = match &lt {
        None => Ok(()),
        Some(l) => libtorch::compare(libtorch::COMPILED_VERSION, libtorch::COMPILED_FROM, l),
    };
    let (loaded_version, version_file) = match lt.as_ref().map(|l| &l.version) {
        Some(Ok((v, f))) => (json!(v), json!(f.display().to_string())),
        _ => (Value::Null, Value::Null),
    };
    let candidates: Vec<String> = process_candidates()
        .iter()
        .map(|c| match c {
            Candidate::File(p) => p.display().to_string(),
            Candidate::Name(n) => n.to_string(),
        })
        .collect();
    #[cfg(feature = "nccl")]
    let nccl = match crate::collective::nccl::load() {
        Ok(l) => json!({"feature": true, "candidates": candidates,
                        "loaded": crate::collective::nccl::describe(l), "error": null}),
        Err(e) => json!({"feature": true, "candidates": candidates, "loaded": null, "error": e}),
    };
    #[cfg(not(feature = "nccl"))]
    let nccl = json!({"feature": false, "candidates": candidates, "loaded": null,
                      "error": "built without the `nccl` cargo feature"});
    json!({
        "scfm_worker": env!("CARGO_PKG_VERSION"),
        "libtorch": {
            "compiled": libtorch::COMPILED_VERSION,
            "compiled_from": libtorch::COMPILED_FROM,
            "loaded": lt.as_ref().map(|l| l.library.display().to_string()),
            "loaded_version": loaded_version,
            "version_file": version_file,
            "error": check.err(),
        },
        "cuda": {
            "available": tch::Cuda::is_available(),
            "devices": tch::Cuda::device_count(),
        },
        "nccl": nccl,
    })
}

/// The report as text lines.
pub fn text(v: &Value) -> String {
    let s = |p: &str| match v.pointer(p) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    };
    let mut out = format!(
        "scfm-worker {}\nlibtorch built against: {} ({})\nlibtorch loaded: {} {} ({})\n",
        s("/scfm_worker"),
        s("/libtorch/compiled"),
        s("/libtorch/compiled_from"),
        s("/libtorch/loaded_version"),
        s("/libtorch/loaded"),
        s("/libtorch/version_file"),
    );
    if let Some(Value::String(e)) = v.pointer("/libtorch/error") {
        out.push_str(&format!("libtorch check: FAILED: {e}\n"));
    }
    out.push_str(&format!(
        "CUDA: available {}, {} device(s)\nNCCL: {}\nNCCL looked for in: {}\n",
        s("/cuda/available"),
        s("/cuda/devices"),
        match v.pointer("/nccl/loaded") {
            Some(Value::String(l)) => l.clone(),
            _ => format!("not loaded: {}", s("/nccl/error")),
        },
        v.pointer("/nccl/candidates")
            .and_then(Value::as_array)
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
    ));
    out
}
