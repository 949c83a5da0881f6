//! The static feature browser: `index.html` (a table of latents, sortable by any column, with a
//! log10-frequency window filter) and one page per latent (exemplar grid, statistics, value
//! histogram). Plain files: opens from file:// with no server; all text is HTML-escaped; the
//! table data is embedded as JSON in the page.
//!
//! ```no_run
//! # use saev::prelude::*;
//! # let store = ActivationStore::open("acts/1a2b3c4d")?;
//! let ex = Explorer::open("runs/a/0", &store)?;
//! let index = saev::explore::write_browser(&ex, "site", &saev::explore::BrowseConfig::default())?;
//! # Ok::<(), saev::Error>(())
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Explorer;
use crate::error::{Error, IoContext, Result};

/// Browser settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrowseConfig {
    /// Images per latent page. Default 8.
    pub n_images: usize,
    /// Latent pages written: the live latents, most frequent first, at most this many (None =
    /// all live latents). Default None.
    pub max_pages: Option<usize>,
    /// Write into an output directory that holds files saev's browser did not write. Default
    /// false: such a directory is refused, never overwritten.
    pub force: bool,
}

/// The file that marks a directory as a saev feature browser.
const BROWSER_MARKER: &str = ".saev-browser.json";

impl Default for BrowseConfig {
    fn default() -> Self {
        Self {
            n_images: 8,
            max_pages: None,
            force: false,
        }
    }
}

impl BrowseConfig {
    /// Set the images per latent page.
    pub fn with_n_images(mut self, n_images: usize) -> Self {
        self.n_images = n_images.max(1);
        self
    }
    /// Write at most `n` latent pages.
    pub fn with_max_pages(mut self, n: usize) -> Self {
        self.max_pages = Some(n);
        self
    }
    /// Write into a directory holding files the browser did not write.
    pub fn with_force(mut self, force: bool) -> Self {
        self.force = force;
        self
    }
}

pub use crate::util::display::html_escape;

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}\
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}th{cursor:pointer;background:#eee}\
td.l{text-align:left}input{width:5em}";

const INDEX_JS: &str = r#"
const rows = JSON.parse(document.getElementById('data').textContent);
let key = 'log10_freq', desc = true;
function fmt(v, d) { return (v === null || !isFinite(v)) ? '' : v.toFixed(d); }
function render() {
  const lo = parseFloat(document.getElementById('lo').value);
  const hi = parseFloat(document.getElementById('hi').value);
  const shown = rows.filter(r => r.log10_freq !== null && r.log10_freq >= lo && r.log10_freq <= hi);
  shown.sort((a, b) => {
    const x = a[key], y = b[key];
    if (x === y) return a.latent - b.latent;
    if (x === null) return 1;
    if (y === null) return -1;
    return (x < y ? -1 : 1) * (desc ? -1 : 1);
  });
  const tb = document.getElementById('body');
  tb.textContent = '';
  for (const r of shown) {
    const tr = document.createElement('tr');
    const cells = [r.latent, fmt(r.log10_freq, 2), fmt(r.log10_mean, 2), fmt(r.max, 2), r.label || '', fmt(r.purity, 2)];
    cells.forEach((v, i) => {
      const td = document.createElement('td');
      if (i === 0 && r.page) {
        const a = document.createElement('a');
        a.href = 'latents/' + r.latent + '.html';
        a.textContent = String(v);
        td.appendChild(a);
      } else {
        td.textContent = String(v);
      }
      if (i === 4) td.className = 'l';
      tr.appendChild(td);
    });
    tb.appendChild(tr);
  }
  document.getElementById('count').textContent = shown.length + ' of ' + rows.length + ' latents';
}
document.querySelectorAll('th').forEach(th => th.addEventListener('click', () => {
  const k = th.dataset.key;
  if (k === key) desc = !desc; else { key = k; desc = true; }
  render();
}));
document.getElementById('lo').addEventListener('input', render);
document.getElementById('hi').addEventListener('input', render);
render();
"#;

fn js_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

/// Write the site into `out`; returns the path of `index.html`.
pub fn write_browser(ex: &Explorer, out: impl AsRef<Path>, cfg: &BrowseConfig) -> Result<PathBuf> {
    let out = out.as_ref();
    // A directory saev's browser wrote carries its marker; anything else non-empty is refused.
    let marker = out.join(BROWSER_MARKER);
    let non_empty = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if non_empty && !marker.exists() && !cfg.force {
        return Err(Error::output_dir(
            out,
            "exists and holds files saev's browser did not write",
            "choose another --out (or --force to write into it)",
        ));
    }
    std::fs::create_dir_all(out).with_path(out)?;
    let f = ex.features();
    let s = f.d_sae();
    let mut live = f.live();
    live.sort_by(|&a, &b| f.freq()[b].total_cmp(&f.freq()[a]).then(a.cmp(&b)));
    if let Some(m) = cfg.max_pages {
        live.truncate(m);
    }
    // What the site shows, recorded with it.
    let made_from = serde_json::json!({
        "version": 2,
        "written_by": "saev browse",
        "sae": ex.sae().config().provenance,
        "d_sae": s,
        "layer": f.layer(),
        "store": ex.store().dir().display().to_string(),
        "store_fingerprint": ex.store().fingerprint(),
        "n_pages": live.len(),
    });
    std::fs::write(&marker, format!("{made_from:#}\n")).with_path(&marker)?;
    let lat_dir = out.join("latents");
    std::fs::create_dir_all(&lat_dir).with_path(&lat_dir)?;
    // A site written before (of another SAE, or with more pages) leaves no stale latent page:
    // only the pages written below are kept (and only files of the browser's own names go).
    let mut keep = vec![false; s];
    for &l in &live {
        keep[l] = true;
    }
    for entry in std::fs::read_dir(&lat_dir).with_path(&lat_dir)? {
        let path = entry.with_path(&lat_dir)?.path();
        let stale = path
            .file_stem()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|l| l >= s || !keep[l])
            && path.extension().is_some_and(|e| e == "html" || e == "png");
        if stale {
            std::fs::remove_file(&path).with_path(&path)?;
        }
    }
    let mut has_page = vec![false; s];
    let classes = ex
        .store()
        .provenance()
        .map(|p| p.classes.clone())
        .unwrap_or_default();
    let bar = crate::util::progress::bar(live.len() as u64, "latent pages");
    for (n, &l) in live.iter().enumerate() {
        has_page[l] = true;
        let grid = ex.grid(l, cfg.n_images)?;
        let png = lat_dir.join(format!("{l}.png"));
        grid.save(&png)?;
        let (hist, lo, w) = f.histogram(l);
        let hmax = hist.iter().copied().max().unwrap_or(1).max(1);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"130\">",
            hist.len() * 8 + 40
        );
        for (i, &c) in hist.iter().enumerate() {
            let hgt = 100.0 * f64::from(c) / f64::from(hmax);
            let _ = write!(
                svg,
                "<rect x=\"{}\" y=\"{:.1}\" width=\"7\" height=\"{hgt:.1}\" fill=\"#5b4bab\"><title>10^{:.2}: {c}</title></rect>",
                20 + i * 8,
                105.0 - hgt,
                lo + w * i as f32
            );
        }
        let _ = write!(
            svg,
            "<text x=\"20\" y=\"122\" font-size=\"10\">10^{lo:.0}</text><text x=\"{}\" y=\"122\" font-size=\"10\">10^{:.0}</text></svg>",
            hist.len() * 8,
            lo + w * hist.len() as f32
        );
        let purity = f
            .purity(ex.store(), l)
            .map(|(lab, q)| {
                let name = classes
                    .get(lab as usize)
                    .cloned()
                    .unwrap_or_else(|| lab.to_string());
                format!("{:.0}% {}", q * 100.0, html_escape(&name))
            })
            .unwrap_or_else(|| "—".into());
        let nav = |k: Option<&usize>, t: &str| match k {
            Some(k) => format!("<a href=\"{k}.html\">{t}</a>"),
            None => String::new(),
        };
        let page = format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>latent {l}</title><style>{STYLE}</style></head><body>\
<p><a href=\"../index.html\">index</a> {} {}</p><h1>latent {l}</h1>\
<table><tr><th>frequency</th><td>{:.3e}</td></tr><tr><th>mean value</th><td>{:.4}</td></tr>\
<tr><th>max</th><td>{:.4}</td></tr><tr><th>top-{} label purity</th><td class=\"l\">{purity}</td></tr></table>\
<h2>top images</h2><img id=\"grid\" src=\"{l}.png\" alt=\"exemplar grid of latent {l}\">\
<h2>values (log10 histogram)</h2>{svg}</body></html>",
            nav(n.checked_sub(1).and_then(|p| live.get(p)), "← previous"),
            nav(live.get(n + 1), "next →"),
            f.freq()[l],
            f.mean_value()[l],
            f.max_value()[l],
            f.top(l).len(),
        );
        let p = lat_dir.join(format!("{l}.html"));
        std::fs::write(&p, page).with_path(&p)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Index: table data as JSON (escaped so it cannot close the script element).
    let table = f;
    let mut data = String::from("[");
    for (l, &page) in has_page.iter().enumerate() {
        let pur = table.purity(ex.store(), l);
        let label = pur.map(|(lab, _)| {
            classes
                .get(lab as usize)
                .cloned()
                .unwrap_or_else(|| lab.to_string())
        });
        let lg = |v: f64| if v > 0.0 { v.log10() } else { f64::NAN };
        let _ = write!(
            data,
            "{}{{\"latent\":{l},\"log10_freq\":{},\"log10_mean\":{},\"max\":{},\"label\":{},\"purity\":{},\"page\":{}}}",
            if l > 0 { "," } else { "" },
            js_num(lg(table.freq()[l])),
            js_num(lg(table.mean_value()[l])),
            js_num(f64::from(table.max_value()[l])),
            match label {
                Some(t) => serde_json::to_string(&t).unwrap_or_else(|_| "null".into()),
                None => "null".into(),
            },
            pur.map(|(_, q)| js_num(q)).unwrap_or_else(|| "null".into()),
            page
        );
    }
    data.push(']');
    let data = data.replace('<', "\\u003c").replace('>', "\\u003e");
    let title = html_escape(&format!(
        "saev features: {} on {}",
        ex.sae()
            .config()
            .provenance
            .get("ckpt")
            .and_then(|v| v.as_str())
            .unwrap_or("SAE"),
        ex.store().dir().display()
    ));
    let index = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>{STYLE}</style></head><body>\
<h1>{title}</h1><p>d_sae {s}; layer {}; {} pages. log10 frequency from <input id=\"lo\" type=\"number\" step=\"0.5\" value=\"-8\"> \
to <input id=\"hi\" type=\"number\" step=\"0.5\" value=\"0\"> <span id=\"count\"></span></p>\
<table><thead><tr><th data-key=\"latent\">latent</th><th data-key=\"log10_freq\">log10 freq</th><th data-key=\"log10_mean\">log10 mean</th>\
<th data-key=\"max\">max</th><th data-key=\"label\">label</th><th data-key=\"purity\">purity</th></tr></thead><tbody id=\"body\"></tbody></table>\
<script type=\"application/json\" id=\"data\">{data}</script><script>{INDEX_JS}</script></body></html>",
        f.layer(),
        live.len()
    );
    let p = out.join("index.html");
    std::fs::write(&p, index).with_path(&p)?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(
            html_escape("<b>T-shirt & \"top\"</b>'"),
            "&lt;b&gt;T-shirt &amp; &quot;top&quot;&lt;/b&gt;&#39;"
        );
    }
}
