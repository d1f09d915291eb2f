//! Explicit histogram buckets for every series we export. Without them the Prometheus exporter
//! renders histograms as summaries, whose quantiles cannot be summed across actors or
//! replicas; with them every histogram has `_bucket{le=...}` lines that `histogram_quantile(sum
//! by (le) (rate(...)))` aggregates. Each role crate declares its buckets next to its metric
//! names (`metrics::BUCKETS`); a histogram that none names gets [`DEFAULT_SECONDS`].

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Buckets (seconds) of a histogram that no crate configures: 1 ms to about 10 minutes.
pub const DEFAULT_SECONDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 150.0, 300.0, 600.0,
];

/// Every (metric name, buckets) pair the role crates declare.
pub fn all() -> impl Iterator<Item = (&'static str, &'static [f64])> {
    hindsight_actor::metrics::BUCKETS
        .iter()
        .chain(hindsight_replay_server::metrics::BUCKETS)
        .chain(hindsight_learner::metrics::BUCKETS)
        .chain(hindsight_evaluator::metrics::BUCKETS)
        .copied()
}

/// `builder` with the default buckets and each crate's per-metric buckets.
pub fn with_buckets(builder: PrometheusBuilder) -> Result<PrometheusBuilder> {
    let mut builder = builder
        .set_buckets(DEFAULT_SECONDS)
        .context("default histogram buckets")?;
    for (name, buckets) in all() {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
            .with_context(|| format!("histogram buckets of {name}"))?;
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a process of every role would export at start-up plus one observation of each
    /// histogram, rendered by the real exporter with our buckets.
    fn render_everything() -> String {
        let recorder = with_buckets(PrometheusBuilder::new().add_global_label("role", "test"))
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            hindsight_actor::metrics::describe();
            hindsight_actor::metrics::init();
            hindsight_learner::metrics::describe();
            hindsight_learner::metrics::init(0);
            hindsight_replay_server::metrics::describe();
            hindsight_replay_server::metrics::init(4);
            hindsight_evaluator::metrics::describe();
            hindsight_evaluator::metrics::init();
            super::super::process::start();
            for (name, _) in all() {
                metrics::histogram!(name).record(0.3);
            }
            metrics::histogram!("hindsight_test_unconfigured_seconds").record(0.3);
        });
        handle.render()
    }

    #[test]
    fn every_histogram_has_its_explicit_buckets() {
        let page = render_everything();
        assert!(!page.contains("quantile="), "a summary slipped in:\n{page}");
        for (name, buckets) in all() {
            assert!(
                page.contains(&format!("# TYPE {name} histogram")),
                "{name} is not a histogram:\n{page}"
            );
            for le in buckets {
                let line = format!("{name}_bucket{{role=\"test\",le=\"{le}\"}} 1");
                let below = format!("{name}_bucket{{role=\"test\",le=\"{le}\"}} 0");
                assert!(
                    page.contains(&line) || page.contains(&below),
                    "{name} lacks the bucket le={le}:\n{page}"
                );
            }
            assert!(page.contains(&format!("{name}_sum{{role=\"test\"}} 0.3")));
            assert!(page.contains(&format!("{name}_count{{role=\"test\"}} 1")));
        }
        assert!(
            page.contains("hindsight_test_unconfigured_seconds_bucket{role=\"test\",le=\"600\"} 1"),
            "a histogram no crate names gets the default buckets:\n{page}"
        );
    }

    #[test]
    fn every_series_follows_the_naming_scheme() {
        let page = render_everything();
        let mut names = Vec::new();
        for line in page.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (name, kind) = rest.split_once(' ').unwrap();
            if name.starts_with("hindsight_test_") {
                continue;
            }
            names.push(name.to_owned());
            if name.starts_with("process_") {
                continue;
            }
            let role_ok = [
                "hindsight_actor_",
                "hindsight_replay_",
                "hindsight_learner_",
                "hindsight_evaluator_",
            ]
            .iter()
            .any(|p| name.starts_with(p))
                || name == "hindsight_build_info";
            assert!(role_ok, "{name}: not hindsight_<role>_...");
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name} ({kind}): counters and only counters end in _total"
            );
            for unit in ["milliseconds", "_ms", "minutes", "kilobytes", "megabytes"] {
                assert!(!name.contains(unit), "{name}: use base units");
            }
            if kind == "histogram" {
                assert!(
                    name.ends_with("_seconds"),
                    "{name}: histograms are durations"
                );
            }
        }
        for expected in [
            "hindsight_build_info",
            "process_start_time_seconds",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "hindsight_actor_policy_version_lag",
            "hindsight_actor_weight_fetch_bytes_total",
            "hindsight_actor_weight_fetch_seconds",
            "hindsight_replay_leases_expired_total",
            "hindsight_replay_prompts_leased_again_total",
            "hindsight_replay_prompts_requeued_total",
            "hindsight_replay_batch_wait_seconds",
            "hindsight_replay_max_staleness",
            "hindsight_learner_idle_seconds",
            "hindsight_learner_busy_seconds",
            "hindsight_learner_steps_total",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} is not exported:\n{page}"
            );
        }
        assert!(
            page.contains(&format!(
                "hindsight_build_info{{role=\"test\",version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{page}"
        );
    }
}
