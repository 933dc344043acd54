//! `index.html` of a report: summary, plots (relative `img src`), evaluation, settings.
//! A static page without scripts; every value from the run is HTML-escaped.

use std::fmt::Write as _;

use serde_json::Value;

use super::plots::{Chart, SIZE};
use super::{EvalDoc, Run};

/// Escapes `s` for HTML text and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A number with 4 significant decimals (exponent form when tiny or huge).
pub fn num(x: f64) -> String {
    let a = x.abs();
    if x.fract() == 0.0 && a < 1e15 {
        format!("{x:.0}")
    } else if a != 0.0 && !(1e-3..1e6).contains(&a) {
        format!("{x:.3e}")
    } else {
        format!("{x:.4}")
    }
}

/// Seconds as `1 h 02 min 03 s` (or `12.3 s`).
pub fn duration(secs: f64) -> String {
    if secs < 60.0 {
        return format!("{secs:.1} s");
    }
    let t = secs.round() as u64;
    let (h, m, s) = (t / 3600, t / 60 % 60, t % 60);
    if h > 0 {
        format!("{h} h {m:02} min {s:02} s")
    } else {
        format!("{m} min {s:02} s")
    }
}

/// A JSON value as table-cell text (numbers formatted, strings as they are).
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map_or_else(|| n.to_string(), num),
        other => other.to_string(),
    }
}

/// The rows of the summary table.
pub fn summary(run: &Run) -> Vec<(&'static str, String)> {
    let m = &run.metrics;
    let mut rows = vec![("Run", run.url.clone())];
    let (Some(first), Some(last)) = (m.steps.first(), m.last()) else {
        return rows;
    };
    rows.push((
        "Steps",
        format!(
            "{} logged, steps {}–{}",
            m.steps.len(),
            first.step,
            last.step
        ),
    ));
    rows.push((
        "Epochs",
        format!(
            "{} (the last step is in epoch {}, 0-based)",
            last.epoch + 1,
            last.epoch
        ),
    ));
    let f = |x: Option<f64>| x.map_or("–".into(), num);
    rows.push((
        "Last training loss",
        format!(
            "total {}, MGEM {}, NT-Xent {} (step {})",
            f(last.loss),
            f(last.mgem),
            f(last.contrastive),
            last.step
        ),
    ));
    if let Some(e) = m.evals.last() {
        rows.push((
            "Last validation loss",
            format!("{} (step {})", num(e.val_loss), e.step),
        ));
    }
    if let Some(b) = m
        .evals
        .iter()
        .min_by(|a, b| a.val_loss.total_cmp(&b.val_loss))
    {
        rows.push((
            "Best validation loss",
            format!("{} (step {})", num(b.val_loss), b.step),
        ));
    }
    let total = m.step_time_total();
    rows.push((
        "Wall time of the steps",
        format!(
            "{} (sum of step times, slowest rank; excludes evaluation, checkpoint and re-formation pauses)",
            duration(total)
        ),
    ));
    if total > 0.0 {
        rows.push((
            "Data wait",
            format!(
                "{:.1} % of the step time",
                100.0 * m.data_wait_total() / total
            ),
        ));
    }
    let rates: Vec<f64> = m.steps.iter().filter_map(|s| s.cells_per_s).collect();
    if !rates.is_empty() {
        let mean = rates.iter().sum::<f64>() / rates.len() as f64;
        rows.push(("Mean cells/s", num(mean.round())));
    }
    let gens = m.step_generations();
    rows.push((
        "Workers",
        format!(
            "at most {}; generations that trained: {}",
            m.max_world_size(),
            gens.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ));
    for r in &m.recoveries {
        rows.push((
            "Re-formation",
            format!(
                "generation {} trained from step {}, {} after the membership change was noticed",
                r.generation,
                r.first_step,
                duration(r.seconds)
            ),
        ));
    }
    let ck = &run.checkpoints;
    rows.push((
        "Checkpoints",
        if ck.is_empty() {
            "none stored".into()
        } else {
            format!(
                "{} stored, at steps {}",
                ck.len(),
                ck.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
            )
        },
    ));
    if let Some(l) = &run.latest {
        rows.push(("latest.json", format!("{} (step {})", l.dir, l.step)));
    }
    if !m.other_events.is_empty() {
        let ev: Vec<String> = m
            .other_events
            .iter()
            .map(|(k, n)| format!("{k} × {n}"))
            .collect();
        rows.push(("Other events", ev.join(", ")));
    }
    rows
}

/// A table; `header` empty: none.
fn table(out: &mut String, header: &[String], rows: &[Vec<String>]) {
    out.push_str("<table>\n");
    if !header.is_empty() {
        out.push_str("<thead><tr>");
        for h in header {
            let _ = write!(out, "<th>{}</th>", esc(h));
        }
        out.push_str("</tr></thead>\n");
    }
    out.push_str("<tbody>\n");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            let _ = write!(out, "<td>{}</td>", esc(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
}

/// An evaluation document: `{"rows": [{..}, ..]}` as a table whose columns are the keys
/// in the order the file first names them (other top-level keys listed below it);
/// anything else as formatted text.
pub fn evaluation(out: &mut String, doc: &EvalDoc) {
    match doc {
        EvalDoc::Text { source, text } => {
            let _ = writeln!(
                out,
                "<p class=\"src\">{}</p>\n<pre>{}</pre>",
                esc(source),
                esc(text)
            );
        }
        EvalDoc::Json {
            source,
            value,
            columns,
        } => {
            let _ = writeln!(out, "<p class=\"src\">{}</p>", esc(source));
            let rows = value.get("rows").and_then(Value::as_array);
            let Some(rows) = rows.filter(|r| r.iter().all(Value::is_object)) else {
                let pretty = serde_json::to_string_pretty(value).unwrap_or_default();
                let _ = writeln!(out, "<pre>{}</pre>", esc(&pretty));
                return;
            };
            // The file's order of keys; any key it missed (none, normally) after them.
            let mut cols = columns.clone();
            for r in rows.iter().filter_map(Value::as_object) {
                for k in r.keys() {
                    if !cols.contains(k) {
                        cols.push(k.clone());
                    }
                }
            }
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| cols.iter().map(|c| cell(&r[c.as_str()])).collect())
                .collect();
            table(out, &cols, &cells);
            if let Some(obj) = value.as_object() {
                let rest: Vec<Vec<String>> = obj
                    .iter()
                    .filter(|(k, _)| k.as_str() != "rows")
                    .map(|(k, v)| vec![k.clone(), cell(v)])
                    .collect();
                if !rest.is_empty() {
                    table(out, &["field".into(), "value".into()], &rest);
                }
            }
        }
    }
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left;vertical-align:top}\
th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%;height:auto;border:1px solid #ddd}\
pre{background:#f7f7f7;padding:1em;overflow-x:auto}.src{color:#666;font-size:90%}\
h2#summary+table td:first-child{font-weight:bold;background:#f3f3f3;white-space:nowrap}";

/// The whole page.
pub fn page(run: &Run, charts: &[Chart]) -> String {
    let mut o = String::new();
    let title = format!("scfm run report: {}", run.url);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<link rel=\"icon\" href=\"data:,\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
        esc(&title),
        esc(&title)
    );
    o.push_str("<h2 id=\"summary\">Summary</h2>\n");
    let rows: Vec<Vec<String>> = summary(run)
        .into_iter()
        .map(|(k, v)| vec![k.to_string(), v])
        .collect();
    table(&mut o, &[], &rows);
    for n in &run.notes {
        let _ = writeln!(o, "<p class=\"src\">Note: {}</p>", esc(n));
    }
    o.push_str("<h2 id=\"plots\">Plots</h2>\n");
    for c in charts {
        let (w, h) = SIZE;
        let _ = writeln!(
            o,
            "<figure id=\"{s}\"><img src=\"{s}.png\" alt=\"{t}\" width=\"{w}\" height=\"{h}\">\n<figcaption>{t} (<a href=\"{s}.svg\">SVG</a>)</figcaption></figure>",
            s = c.stem,
            t = esc(&c.title),
        );
    }
    if !run.evaluation.is_empty() {
        o.push_str("<h2 id=\"evaluation\">Evaluation</h2>\n");
        for d in &run.evaluation {
            evaluation(&mut o, d);
        }
    }
    o.push_str("<h2 id=\"settings\">Settings</h2>\n");
    match &run.state {
        Some((dir, state)) => {
            let pretty = serde_json::to_string_pretty(state).unwrap_or_default();
            let _ = writeln!(
                o,
                "<p class=\"src\">{}/state.json (model config, settings and progress of the newest checkpoint)</p>\n<pre>{}</pre>",
                esc(dir),
                esc(&pretty)
            );
        }
        None => o.push_str("<p>No checkpoint state.json was found.</p>\n"),
    }
    if let Some((key, text)) = &run.manifest {
        let _ = writeln!(
            o,
            "<p class=\"src\">{}</p>\n<pre>{}</pre>",
            esc(key),
            esc(text)
        );
    }
    o.push_str("</body>\n</html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escaping_and_numbers() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(num(3.0), "3");
        assert_eq!(num(0.123456), "0.1235");
        assert_eq!(num(0.00001234), "1.234e-5");
        assert_eq!(duration(5.25), "5.2 s");
        assert_eq!(duration(3723.0), "1 h 02 min 03 s");
        assert_eq!(duration(61.0), "1 min 01 s");
    }

    #[test]
    fn json_rows_become_a_table_with_the_union_of_keys() {
        let text = r#"{"rows": [
                {"embedding": "scfm", "ari": 0.51234, "nmi": 0.6},
                {"embedding": "<pca>", "ari": 0.4, "silhouette": 0.1}
            ], "dataset": "mouse10k"}"#;
        let doc = super::super::eval_doc("evaluation.json", text.as_bytes()).unwrap();
        let mut o = String::new();
        evaluation(&mut o, &doc);
        assert!(
            o.contains("<th>embedding</th><th>ari</th><th>nmi</th><th>silhouette</th>"),
            "{o}"
        );
        assert!(
            o.contains("<td>scfm</td><td>0.5123</td><td>0.6000</td><td></td>"),
            "{o}"
        );
        assert!(o.contains("<td>&lt;pca&gt;</td>"), "{o}");
        assert!(o.contains("<td>dataset</td><td>mouse10k</td>"), "{o}");
        let mut o = String::new();
        evaluation(
            &mut o,
            &EvalDoc::Json {
                source: "e.json".into(),
                value: json!([1, 2]),
                columns: Vec::new(),
            },
        );
        assert!(o.contains("<pre>[\n  1,\n  2\n]</pre>"), "{o}");
    }
}
