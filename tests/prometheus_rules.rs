//! `deploy/prometheus/` and `deploy/grafana/` checked with the real promtool (Debian's
//! `prometheus` package, unpacked by `scripts/prometheus-dist.sh`): the scrape configuration,
//! the rules, the rules' unit tests, every dashboard query's syntax, and that every series the
//! rules and the dashboard name is one the code exports. Fails (never skips) when promtool
//! cannot be had.

mod monitoring;

use std::collections::BTreeSet;
use std::path::Path;

use monitoring::*;

fn check(dist: &Path, cwd: &Path, args: &[&str]) {
    let (ok, out) = promtool(dist, cwd, args);
    assert!(ok, "promtool {} failed:\n{out}", args.join(" "));
}

#[test]
fn prometheus_config_rules_and_rule_tests_pass_promtool() {
    let dist = prometheus_dist();
    let dir = repo().join("deploy/prometheus");
    check(&dist, &dir, &["check", "config", "prometheus.yml"]);
    check(
        &dist,
        &dir,
        &["check", "rules", "rules/hindsight.rules.yml"],
    );
    let (ok, out) = promtool(
        &dist,
        &dir,
        &["test", "rules", "rules/hindsight.rules.test.yml"],
    );
    assert!(ok && out.contains("SUCCESS"), "promtool test rules:\n{out}");
}

#[test]
fn rule_tests_cover_every_alert_firing_and_not_firing() {
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/rules/hindsight.rules.yml"))
        .unwrap();
    let tests =
        std::fs::read_to_string(repo().join("deploy/prometheus/rules/hindsight.rules.test.yml"))
            .unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 5, "{alerts:?}");
    // Each `alertname:` line of the tests, followed by its expectation (empty or not).
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for alert in alerts {
        let mut fires = false;
        let mut silent = false;
        for (i, l) in lines.iter().enumerate() {
            if *l == format!("alertname: {alert}") {
                match lines.get(i + 1) {
                    Some(&"exp_alerts: []") => silent = true,
                    Some(&"exp_alerts:") => fires = true,
                    other => panic!("{alert}: unexpected line after alertname: {other:?}"),
                }
            }
        }
        assert!(fires, "no rule test shows {alert} firing");
        assert!(silent, "no rule test shows {alert} not firing");
    }
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    let dist = prometheus_dist();
    let dash = dashboard();
    let queries = dashboard_queries(&dash);
    assert!(queries.len() >= 30, "only {} queries", queries.len());
    let vars = dashboard_variables(&dash, 5);
    // Each query becomes a recording rule; promtool parses every expression offline.
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let expr = substitute(&q.expr, &vars);
        assert!(
            !expr.contains('$') && !expr.contains("[["),
            "panel {:?}: a variable is left in {expr}",
            q.panel
        );
        file += &format!(
            "      - record: dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("dashboard.rules.yml"), file).unwrap();
    check(
        &dist,
        tmp.path(),
        &["check", "rules", "dashboard.rules.yml"],
    );
}

#[test]
fn dashboard_panels_are_well_formed() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "hindsight");
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} repeats");
        let title = p["title"].as_str().expect("panel title");
        if p["type"] == "row" {
            continue;
        }
        assert!(titles.insert(title), "panel title {title:?} repeats");
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {title:?} must use the datasource variable"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "panel {title:?} is wider than the grid"
        );
    }
    // What the issue asks a user can see.
    for wanted in [
        "Step rate",
        "Reward and success",
        "Samples trained",
        "Loss",
        "Gradient norm and clipping",
        "Tokens per second, per actor",
        "Version lag per actor",
        "Leases per actor",
        "Ingest rate",
        "Queue depth",
        "Pass rate per instruction id",
        "Replays and shortfall",
        "Weight fetch time",
        "Versions",
        "Resident memory",
        "CPU",
    ] {
        assert!(titles.contains(wanted), "no panel {wanted:?}");
    }
}

/// Every `hindsight_*` / `process_*` name in the source (string literals of the crates'
/// metric modules and of the process collector).
fn exported_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in [
        "actor/src/metrics.rs",
        "learner/src/metrics.rs",
        "replay-server/src/metrics.rs",
        "evaluator/src/metrics.rs",
        "src/telemetry/process.rs",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        for piece in text.split('"').skip(1).step_by(2) {
            if (piece.starts_with("hindsight_") || piece.starts_with("process_"))
                && piece.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            {
                names.insert(piece.to_owned());
            }
        }
    }
    names
}

/// Series names used in `text` (PromQL identifiers starting with `hindsight_` or `process_`;
/// recording rules, which hold a ':', are not series the code exports).
fn used_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| {
            (t.starts_with("hindsight_") || t.starts_with("process_"))
                && !t.contains(':')
                && !t.ends_with('_')
        })
        .map(|t| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| t.strip_suffix(s))
                .unwrap_or(t);
            base.to_owned()
        })
        .collect()
}

#[test]
fn rules_and_dashboard_name_only_series_the_code_exports() {
    let exported = exported_names();
    assert!(exported.len() > 50, "{exported:?}");
    for file in [
        "deploy/prometheus/rules/hindsight.rules.yml",
        "deploy/grafana/dashboards/hindsight.json",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        let unknown: Vec<String> = used_names(&text)
            .into_iter()
            .filter(|n| !exported.contains(n))
            .collect();
        assert!(
            unknown.is_empty(),
            "{file} names series nobody exports: {unknown:?}"
        );
    }
}

#[test]
fn variables_are_substituted_like_grafana() {
    let vars = vec![
        ("__range".to_owned(), "1h".to_owned()),
        ("__rate_interval".to_owned(), "20s".to_owned()),
        ("actor".to_owned(), ".*".to_owned()),
    ];
    assert_eq!(
        substitute(
            r#"rate(x{instance=~"$actor"}[$__rate_interval]) + y{a=~"${actor}",b=~"${actor:regex}",c=~"[[actor]]"}[$__range] + $actors"#,
            &vars
        ),
        r#"rate(x{instance=~".*"}[20s]) + y{a=~".*",b=~".*",c=~".*"}[1h] + $actors"#
    );
}
