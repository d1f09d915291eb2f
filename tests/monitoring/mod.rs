//! Shared helpers of the monitoring tests (`prometheus_rules.rs`, `dashboard.rs`, and the
//! compose test): get the real `prometheus` / `promtool` from Debian's package through
//! `scripts/prometheus-dist.sh`, run a Prometheus, query its HTTP API, and pull every panel's
//! query out of a Grafana dashboard with the dashboard's variables substituted the way Grafana
//! would. No HTTP client library: Prometheus answers plain HTTP/1.0.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `deploy/grafana/dashboards/hindsight.json`, parsed.
pub fn dashboard() -> Value {
    let path = repo().join("deploy/grafana/dashboards/hindsight.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The unpacked Debian `prometheus` package (holds `usr/bin/prometheus` and
/// `usr/bin/promtool`), fetched once by `scripts/prometheus-dist.sh`. Panics with the script's
/// own message when it cannot be had: these tests never skip.
pub fn prometheus_dist() -> PathBuf {
    let script = repo().join("scripts/prometheus-dist.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cannot get Prometheus and promtool ({} exited with {}):\n{stderr}\nThe monitoring \
         tests need Debian's `prometheus` package (apt-get download, no root needed once the \
         package lists exist).",
        script.display(),
        out.status
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    for bin in ["prometheus", "promtool"] {
        assert!(
            dir.join("usr/bin").join(bin).is_file(),
            "{} printed {} but it holds no usr/bin/{bin}",
            script.display(),
            dir.display()
        );
    }
    dir
}

/// Runs `promtool ARGS` in `cwd`; returns (success, stdout + stderr).
pub fn promtool(dist: &Path, cwd: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(dist.join("usr/bin/promtool"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("running promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// One query of one panel.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    /// The panel's title (rows' titles are not included).
    pub panel: String,
    /// The target's `refId`.
    pub ref_id: String,
    /// The query as written in the dashboard (variables not substituted).
    pub expr: String,
    /// An instant query (table, bar gauge) rather than a range one.
    pub instant: bool,
}

/// Every query of every panel of `dashboard`, including the panels of collapsed rows.
/// Panics on a panel with a target that has no `expr` (a broken dashboard).
pub fn dashboard_queries(dashboard: &Value) -> Vec<PanelQuery> {
    fn walk(panels: &[Value], out: &mut Vec<PanelQuery>) {
        for p in panels {
            if let Some(nested) = p["panels"].as_array() {
                walk(nested, out);
            }
            let title = p["title"].as_str().unwrap_or("(untitled)").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                if t["hide"].as_bool() == Some(true) {
                    continue;
                }
                let expr = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {title:?} has a target without an expr: {t}"));
                out.push(PanelQuery {
                    panel: title.clone(),
                    ref_id: t["refId"].as_str().unwrap_or("?").to_owned(),
                    expr: expr.to_owned(),
                    instant: t["instant"].as_bool() == Some(true),
                });
            }
        }
    }
    let mut out = Vec::new();
    walk(
        dashboard["panels"]
            .as_array()
            .expect("dashboard has panels"),
        &mut out,
    );
    out
}

/// Values for the dashboard's own variables as "All" would give them (a query variable's
/// `allValue`, else `.*`), plus Grafana's built-ins for a Prometheus scraped every
/// `scrape_secs`: `$__rate_interval` is four scrapes (Grafana's lower bound), `$__interval`
/// one, `$__range` the last hour.
pub fn dashboard_variables(dashboard: &Value, scrape_secs: u64) -> Vec<(String, String)> {
    let mut vars = vec![
        (
            "__rate_interval".to_owned(),
            format!("{}s", 4 * scrape_secs),
        ),
        ("__interval".to_owned(), format!("{scrape_secs}s")),
        ("__range".to_owned(), "1h".to_owned()),
    ];
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = v["name"].as_str().expect("variable has a name").to_owned();
        if v["type"] == "datasource" {
            continue;
        }
        let value = v["allValue"].as_str().unwrap_or(".*").to_owned();
        vars.push((name, value));
    }
    vars
}

/// `expr` with `$name`, `${name}`, `${name:format}` and `[[name]]` replaced. Longer names go
/// first so that `$__range` does not eat the start of `$__range_s`.
pub fn substitute(expr: &str, vars: &[(String, String)]) -> String {
    let mut vars: Vec<&(String, String)> = vars.iter().collect();
    vars.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    let mut out = expr.to_owned();
    for (name, value) in vars {
        out = out.replace(&format!("${{{name}}}"), value);
        out = out.replace(&format!("[[{name}]]"), value);
        while let Some(at) = out.find(&format!("${{{name}:")) {
            let end = out[at..].find('}').map(|e| at + e + 1).unwrap_or(out.len());
            out.replace_range(at..end, value);
        }
        // `$name` only where the name ends (not `$actor` inside `$actors`).
        let pat = format!("${name}");
        let mut rebuilt = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(at) = rest.find(&pat) {
            let after = &rest[at + pat.len()..];
            rebuilt += &rest[..at];
            if after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                rebuilt += &pat;
            } else {
                rebuilt += value;
            }
            rest = after;
        }
        rebuilt += rest;
        out = rebuilt;
    }
    out
}

/// A free loopback port (bound and released; good enough for a test).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Percent-encodes a query string value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

/// `GET path` over HTTP/1.0; returns the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_owned()))
}

/// A real Prometheus process on loopback, killed when dropped.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl Prometheus {
    /// Starts `usr/bin/prometheus` of `dist` with `config` (YAML text) written into `dir`,
    /// and waits until it is ready.
    pub fn start(dist: &Path, dir: &Path, config: &str) -> Prometheus {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(dist.join("usr/bin/prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        let mut p = Prometheus {
            child,
            addr,
            dir: dir.to_owned(),
        };
        let started = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(addr, "/-/ready") {
                return p;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", p.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "prometheus not ready after 30 s:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query (see [`query`]).
    pub fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        query(self.addr, expr)
    }

    /// `/api/v1/targets`' active targets.
    pub fn targets(&self) -> Vec<Value> {
        let (_, body) = http_get(self.addr, "/api/v1/targets?state=active").expect("targets");
        let v: Value = serde_json::from_str(&body).expect("targets JSON");
        v["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An instant query through the HTTP API of the Prometheus at `addr` (`/api/v1/query`): the
/// `result` array, or the error Prometheus gave.
pub fn query(addr: SocketAddr, expr: &str) -> Result<Vec<Value>, String> {
    let (code, body) = http_get(addr, &format!("/api/v1/query?query={}", urlencode(expr)))
        .map_err(|e| format!("querying prometheus at {addr}: {e}"))?;
    let v: Value = serde_json::from_str(&body)
        .map_err(|e| format!("HTTP {code}, not JSON ({e}): {body:.300}"))?;
    if v["status"] != "success" {
        return Err(format!(
            "HTTP {code}: {} {}",
            v["errorType"].as_str().unwrap_or(""),
            v["error"].as_str().unwrap_or(&body)
        ));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// Evaluates every query of `dashboard` against the Prometheus at `addr` (scraping every
/// `scrape_secs`) and returns one line per query that failed or returned no series, naming
/// its panel (empty: every panel has data). The compose test can call it with Prometheus's
/// published loopback port.
pub fn panels_without_data(addr: SocketAddr, dashboard: &Value, scrape_secs: u64) -> Vec<String> {
    let vars = dashboard_variables(dashboard, scrape_secs);
    let mut missing = Vec::new();
    for q in dashboard_queries(dashboard) {
        let expr = substitute(&q.expr, &vars);
        match query(addr, &expr) {
            Ok(result) if !result.is_empty() => {}
            Ok(_) => missing.push(format!(
                "panel {:?} query {}: no series for {expr}",
                q.panel, q.ref_id
            )),
            Err(e) => missing.push(format!(
                "panel {:?} query {}: {e} (query {expr})",
                q.panel, q.ref_id
            )),
        }
    }
    missing
}
