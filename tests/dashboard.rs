//! The Grafana dashboard against real data, without Docker: a real `hindsight up` on the tiny
//! model (replay server, learner, two actors and an evaluator as processes), a real Prometheus (Debian's
//! package) scraping their `/metrics` every second with the recording and alerting rules
//! loaded, then every panel's query from `deploy/grafana/dashboards/hindsight.json` through
//! Prometheus' HTTP API: the test fails naming each panel whose query returns no series, each
//! recording rule without a result, and each target that is not up.

mod common;
mod monitoring;

use std::time::{Duration, Instant};

use common::*;
use monitoring::*;

const SCRAPE_SECS: u64 = 1;

#[test]
fn every_dashboard_panel_has_data_from_a_real_cluster() {
    let started = Instant::now();
    let dist = prometheus_dist();
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut up = Up::start(
        &run_dir,
        &[
            "--model",
            "tiny",
            "--actors",
            "2",
            "--steps",
            "5",
            "--max-new-tokens",
            "24",
            "--prompts-per-batch",
            "2",
            "--threads-per-process",
            "1",
            // The evaluator's panels: every version, on 2 prompts.
            "--eval-every",
            "1",
            "--eval-limit",
            "2",
        ],
    );
    let (endpoints, _) = wait_until(
        up.child(),
        &run_dir,
        Duration::from_secs(60),
        "endpoints.json with every process",
        || {
            read_endpoints(&run_dir)
                .filter(|e| e["metrics"].as_object().is_some_and(|m| m.len() == 5))
        },
    );

    // One job per role, the names the compose configuration uses.
    let mut jobs: Vec<(&str, Vec<String>)> = vec![
        ("replay-server", vec![]),
        ("learner", vec![]),
        ("actor", vec![]),
        ("evaluator", vec![]),
    ];
    for (name, url) in endpoints["metrics"].as_object().unwrap() {
        let target = url
            .as_str()
            .unwrap()
            .trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .to_owned();
        let job = if name.starts_with("actor") {
            "actor"
        } else {
            name.as_str()
        };
        jobs.iter_mut()
            .find(|(j, _)| *j == job)
            .unwrap_or_else(|| panic!("unexpected process {name} in endpoints.json"))
            .1
            .push(target);
    }
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(prom_dir.join("rules")).unwrap();
    std::fs::copy(
        repo().join("deploy/prometheus/rules/hindsight.rules.yml"),
        prom_dir.join("rules/hindsight.rules.yml"),
    )
    .unwrap();
    let mut config = format!(
        "global:\n  scrape_interval: {SCRAPE_SECS}s\n  scrape_timeout: {SCRAPE_SECS}s\n  \
         evaluation_interval: {SCRAPE_SECS}s\nrule_files:\n  - rules/hindsight.rules.yml\n\
         scrape_configs:\n"
    );
    for (job, targets) in &jobs {
        let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        config += &format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
    }
    let prom = Prometheus::start(&dist, &prom_dir, &config);

    // The run's learner steps, seen by Prometheus (`--linger` keeps every process serving
    // afterwards, so that the run ends cleanly when the test stops it).
    wait_until(
        up.child(),
        &run_dir,
        Duration::from_secs(120),
        "5 learner steps in Prometheus",
        || {
            prom.query("max(hindsight_learner_steps_total) >= 5")
                .ok()
                .filter(|r| !r.is_empty())
        },
    );

    // Every target up (5 processes), each by the job it should be in. Each target's first
    // scrape comes at its own offset within the interval: poll.
    let polled = Instant::now();
    while prom
        .query("count(up == 1) == 5")
        .map_or(true, |r| r.is_empty())
        && polled.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let up_series = prom.query("up").expect("query up");
    let mut down: Vec<String> = Vec::new();
    for s in &up_series {
        if s["value"][1] != "1" {
            down.push(s["metric"].to_string());
        }
    }
    assert!(
        up_series.len() == 5 && down.is_empty(),
        "targets not all up: {} series, down: {down:?}\ntargets: {:#?}\n{}",
        up_series.len(),
        prom.targets(),
        prom.log()
    );
    let actors = prom
        .query(r#"count(up{job="actor"} == 1)"#)
        .expect("count actors");
    assert_eq!(actors[0]["value"][1], "2", "{actors:?}");

    // Every panel's query returns series. Counters need two scrapes inside a rate window and
    // the weight and batch histograms a first observation: poll until all have data.
    let dashboard = dashboard();
    let queries = dashboard_queries(&dashboard).len();
    let polled = Instant::now();
    loop {
        let missing = panels_without_data(prom.addr, &dashboard, SCRAPE_SECS);
        if missing.is_empty() {
            break;
        }
        if polled.elapsed() > Duration::from_secs(30) {
            panic!(
                "{} of {queries} dashboard queries have no data after {:?}:\n{}\n{}",
                missing.len(),
                polled.elapsed(),
                missing.join("\n"),
                dump_logs(&run_dir)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    // Every recording rule yields a result against real data.
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/rules/hindsight.rules.yml"))
        .unwrap();
    // Rule groups run at their own offset within the interval: poll.
    let records: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .collect();
    let polled = Instant::now();
    loop {
        let empty: Vec<String> = records
            .iter()
            .filter_map(|record| match prom.query(record) {
                Ok(r) if !r.is_empty() => None,
                other => Some(format!("{record}: {other:?}")),
            })
            .collect();
        if empty.is_empty() {
            break;
        }
        assert!(
            polled.elapsed() < Duration::from_secs(20),
            "recording rules without data after {:?}:\n{}",
            polled.elapsed(),
            empty.join("\n")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Every rule, alerts included, evaluates on real data without an error (a vector
    // matching mistake only shows there), and no alert fires on this healthy cluster.
    let polled = Instant::now();
    loop {
        let (_, body) = http_get(prom.addr, "/api/v1/rules").expect("rules API");
        let v: serde_json::Value = serde_json::from_str(&body).expect("rules JSON");
        let rules: Vec<&serde_json::Value> = v["data"]["groups"]
            .as_array()
            .expect("rule groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().iter())
            .collect();
        assert!(rules.len() >= 10, "rules not loaded: {body:.500}");
        let broken: Vec<String> = rules
            .iter()
            .filter(|r| r["health"] == "err")
            .map(|r| format!("{}: {}", r["name"], r["lastError"]))
            .collect();
        assert!(broken.is_empty(), "rules failing on real data: {broken:?}");
        let firing: Vec<String> = rules
            .iter()
            .filter(|r| r["state"] == "firing")
            .map(|r| r["name"].to_string())
            .collect();
        assert!(
            firing.is_empty(),
            "alerts firing on a healthy cluster: {firing:?}"
        );
        if rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        assert!(
            polled.elapsed() < Duration::from_secs(20),
            "rules not all evaluated after {:?}: {body:.1000}",
            polled.elapsed()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    drop(prom);
    let child = up.take();
    stop_up(child, &run_dir);
    println!(
        "{queries} dashboard queries with data; whole test {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
