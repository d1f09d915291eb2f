//! The environment naming scheme: every flag `--foo-bar` of the roles (`replay-server`,
//! `learner`, `actor`), of `up`, `status`, `health` and `fetch-model`, and every global flag,
//! reads `HINDSIGHT_FOO_BAR`, one name per meaning across roles (`HINDSIGHT_MODEL` is the model
//! for the replay server, the learner and the actors alike). Names of earlier versions that
//! carried a role prefix still work: [`apply_old_names`] copies them to the new name when
//! that one is not set, and `main` warns about each. The offline tools (`verify`, `convert`,
//! `certs`) take flags only, and `bench`'s variables are `HINDSIGHT_BENCH_*`, so that a shell
//! set up for a cluster does not change a benchmark.

/// Old name, new name.
const OLD_NAMES: &[(&str, &str)] = &[
    ("HINDSIGHT_REPLAY_LISTEN", "HINDSIGHT_LISTEN"),
    ("HINDSIGHT_LEARNER_LISTEN", "HINDSIGHT_LISTEN"),
    ("HINDSIGHT_REPLAY_MODEL", "HINDSIGHT_MODEL"),
    ("HINDSIGHT_REPLAY_CACHE_DIR", "HINDSIGHT_CACHE_DIR"),
    ("HINDSIGHT_REPLAY_PROMPTS", "HINDSIGHT_PROMPTS"),
    ("HINDSIGHT_REPLAY_NUM_PROMPTS", "HINDSIGHT_NUM_PROMPTS"),
    ("HINDSIGHT_REPLAY_SEED", "HINDSIGHT_SEED"),
    ("HINDSIGHT_REPLAY_GROUP_SIZE", "HINDSIGHT_GROUP_SIZE"),
    (
        "HINDSIGHT_REPLAY_RESPONSES_PER_PROMPT",
        "HINDSIGHT_RESPONSES_PER_PROMPT",
    ),
    ("HINDSIGHT_REPLAY_HINDSIGHT", "HINDSIGHT_HINDSIGHT"),
    (
        "HINDSIGHT_REPLAY_PROMPTS_PER_BATCH",
        "HINDSIGHT_PROMPTS_PER_BATCH",
    ),
    ("HINDSIGHT_REPLAY_LAMBDA0", "HINDSIGHT_LAMBDA0"),
    ("HINDSIGHT_REPLAY_ETA", "HINDSIGHT_ETA"),
    ("HINDSIGHT_REPLAY_MAX_STALENESS", "HINDSIGHT_MAX_STALENESS"),
    (
        "HINDSIGHT_REPLAY_MAX_PENDING_BATCHES",
        "HINDSIGHT_MAX_PENDING_BATCHES",
    ),
    (
        "HINDSIGHT_REPLAY_MAX_PENDING_BYTES",
        "HINDSIGHT_MAX_PENDING_BYTES",
    ),
    ("HINDSIGHT_REPLAY_SEGMENT_BYTES", "HINDSIGHT_SEGMENT_BYTES"),
    (
        "HINDSIGHT_REPLAY_LEASE_TIMEOUT_MS",
        "HINDSIGHT_LEASE_TIMEOUT_MS",
    ),
    ("HINDSIGHT_REPLAY_TEMPERATURE", "HINDSIGHT_TEMPERATURE"),
    ("HINDSIGHT_REPLAY_TOP_P", "HINDSIGHT_TOP_P"),
    (
        "HINDSIGHT_REPLAY_MAX_NEW_TOKENS",
        "HINDSIGHT_MAX_NEW_TOKENS",
    ),
    ("HINDSIGHT_REPLAY_DATA_DIR", "HINDSIGHT_DATA_DIR"),
    ("HINDSIGHT_REPLAY_BATCH_LOG", "HINDSIGHT_BATCH_LOG"),
    (
        "HINDSIGHT_REPLAY_MAX_MESSAGE_BYTES",
        "HINDSIGHT_MAX_MESSAGE_BYTES",
    ),
    ("HINDSIGHT_REPLAY_URL", "HINDSIGHT_REPLAY"),
    ("HINDSIGHT_LEARNER_URL", "HINDSIGHT_LEARNER"),
    ("HINDSIGHT_LEARNER_DEVICE", "HINDSIGHT_DEVICE"),
    ("HINDSIGHT_ACTOR_DEVICE", "HINDSIGHT_DEVICE"),
    ("HINDSIGHT_ACTOR_PRECISION", "HINDSIGHT_PRECISION"),
    ("HINDSIGHT_ACTOR_MAX_BATCH", "HINDSIGHT_MAX_BATCH"),
];

/// Copies each old variable that is set to its new name when the new one is not set;
/// returns the (old, new) pairs it copied. Call before any thread starts.
pub fn apply_old_names() -> Vec<(&'static str, &'static str)> {
    let mut copied = Vec::new();
    for &(old, new) in OLD_NAMES {
        if let Some(value) = std::env::var_os(old) {
            if std::env::var_os(new).is_none() {
                std::env::set_var(new, value);
                copied.push((old, new));
            }
        }
    }
    copied
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The variable a flag reads under the scheme: `--foo-bar` -> `HINDSIGHT_FOO_BAR`.
    fn var_for_flag(long: &str) -> String {
        format!("HINDSIGHT_{}", long.replace('-', "_").to_ascii_uppercase())
    }

    /// Every flag of every subcommand (nested ones too) and its variable.
    fn flags(cmd: &clap::Command, path: &str, out: &mut Vec<(String, String, Option<String>)>) {
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            out.push((path.to_string(), long.to_string(), env));
        }
        for sub in cmd.get_subcommands() {
            if matches!(
                sub.get_name(),
                "verify" | "eval" | "convert" | "certs" | "bench" | "plot"
            ) {
                continue;
            }
            flags(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    fn all_flags() -> Vec<(String, String, Option<String>)> {
        let mut out = Vec::new();
        flags(&crate::Cli::command(), "hindsight", &mut out);
        out
    }

    #[test]
    fn every_flag_reads_hindsight_flag_name() {
        let mut wrong = Vec::new();
        for (cmd, long, env) in all_flags() {
            let want = var_for_flag(&long);
            if env.as_deref() != Some(want.as_str()) {
                wrong.push(format!("{cmd} --{long}: env {env:?}, want {want}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "flags off the scheme:\n{}",
            wrong.join("\n")
        );
    }

    #[test]
    fn old_names_map_to_variables_that_exist() {
        let vars: std::collections::BTreeSet<String> =
            all_flags().into_iter().filter_map(|(_, _, e)| e).collect();
        for (old, new) in OLD_NAMES {
            assert!(vars.contains(*new), "{old} -> {new}: no flag reads {new}");
            assert!(!vars.contains(*old), "{old} is still read by a flag");
        }
    }

    #[test]
    fn readme_lists_every_variable() {
        let readme = include_str!("../README.md");
        let vars: std::collections::BTreeSet<String> =
            all_flags().into_iter().filter_map(|(_, _, e)| e).collect();
        let missing: Vec<&String> = vars
            .iter()
            .filter(|v| !readme.contains(&format!("`{v}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "README.md's environment table lacks {missing:?}"
        );
    }
}
