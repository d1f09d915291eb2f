//! Turning a role's typed arguments back into a command line ([`ToArgv`]), so that a process
//! that starts another role (`hindsight up`) builds the child's `Args` struct and renders it,
//! instead of formatting flags by hand. Each `Args` struct implements it next to its
//! definition; a round-trip test (render, parse with clap, compare) keeps the two in step.

use std::fmt::Display;
use std::path::Path;

/// A command line built flag by flag (`--flag value`, or `--flag` for a switch on).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Argv(Vec<String>);

impl Argv {
    pub fn new() -> Self {
        Self::default()
    }

    /// `--flag value`.
    pub fn opt(&mut self, flag: &str, value: impl Display) -> &mut Self {
        self.0.push(flag.to_owned());
        self.0.push(value.to_string());
        self
    }

    /// `--flag value` when `value` is set.
    pub fn opt_some<T: Display>(&mut self, flag: &str, value: &Option<T>) -> &mut Self {
        if let Some(v) = value {
            self.opt(flag, v);
        }
        self
    }

    /// `--flag PATH`.
    pub fn path(&mut self, flag: &str, path: &Path) -> &mut Self {
        self.opt(flag, path.display())
    }

    /// `--flag PATH` when set.
    pub fn path_some(&mut self, flag: &str, path: &Option<impl AsRef<Path>>) -> &mut Self {
        if let Some(p) = path {
            self.path(flag, p.as_ref());
        }
        self
    }

    /// `--flag` when `on`.
    pub fn switch(&mut self, flag: &str, on: bool) -> &mut Self {
        if on {
            self.0.push(flag.to_owned());
        }
        self
    }

    /// `--flag NAME` with the value's name on the command line (`clap::ValueEnum`).
    pub fn value_enum<E: clap::ValueEnum>(&mut self, flag: &str, value: &E) -> &mut Self {
        let name = value
            .to_possible_value()
            .expect("a value enum variant that is not skipped")
            .get_name()
            .to_owned();
        self.opt(flag, name)
    }

    /// Appends another rendering (a flattened group of flags).
    pub fn extend(&mut self, other: &impl ToArgv) -> &mut Self {
        self.0.extend(other.to_argv());
        self
    }

    pub fn into_vec(self) -> Vec<String> {
        self.0
    }
}

/// Arguments that can be rendered as the command-line flags that parse back to them.
pub trait ToArgv {
    fn to_argv(&self) -> Vec<String>;
}

impl ToArgv for crate::ServerSecurityArgs {
    fn to_argv(&self) -> Vec<String> {
        let mut a = Argv::new();
        a.path_some("--tls-cert", &self.tls_cert)
            .path_some("--tls-key", &self.tls_key)
            .path_some("--auth-tokens", &self.auth_tokens)
            .switch("--insecure", self.insecure);
        a.into_vec()
    }
}

impl ToArgv for crate::ClientSecurityArgs {
    fn to_argv(&self) -> Vec<String> {
        let mut a = Argv::new();
        a.path_some("--tls-ca", &self.tls_ca)
            .path_some("--token-file", &self.token_file)
            .opt_some("--token", &self.token)
            .opt_some("--tls-domain", &self.tls_domain);
        a.into_vec()
    }
}

impl ToArgv for crate::ShutdownArgs {
    fn to_argv(&self) -> Vec<String> {
        let mut a = Argv::new();
        a.opt("--shutdown-timeout-secs", self.shutdown_timeout_secs);
        a.into_vec()
    }
}

/// `T` as a process would parse it from an empty command line: every field its default or
/// its `HINDSIGHT_*` variable. A launcher (`hindsight up`) starts from this and sets what it
/// decides, so a variable set for the launcher still reaches the child's other flags.
pub fn from_env<T: clap::Args + clap::FromArgMatches>() -> anyhow::Result<T> {
    let cmd = T::augment_args(clap::Command::new("x").no_binary_name(true));
    let matches = cmd
        .try_get_matches_from(Vec::<String>::new())
        .map_err(|e| crate::ConfigError::wrap(anyhow::anyhow!("{}", e.to_string().trim())))?;
    T::from_arg_matches(&matches)
        .map_err(|e| crate::ConfigError::wrap(anyhow::anyhow!("{}", e.to_string().trim())))
}

/// Test support: checks that `args` renders to flags that parse back to an equal value
/// (compared by `Debug`), and that the rendering names every flag `T` has (so a field added
/// to the struct but not to its `to_argv` is caught, given an `args` with every option set).
pub fn assert_round_trip<T>(args: &T)
where
    T: ToArgv + clap::Args + clap::FromArgMatches + std::fmt::Debug,
{
    let cmd = T::augment_args(clap::Command::new("x").no_binary_name(true));
    let argv = args.to_argv();
    let matches = cmd
        .clone()
        .try_get_matches_from(&argv)
        .unwrap_or_else(|e| panic!("{argv:?} does not parse: {e}"));
    let parsed = T::from_arg_matches(&matches).unwrap();
    assert_eq!(format!("{parsed:?}"), format!("{args:?}"), "argv {argv:?}");
    for arg in cmd.get_arguments() {
        if let Some(long) = arg.get_long() {
            let flag = format!("--{long}");
            assert!(
                argv.contains(&flag),
                "--{long} is not rendered by to_argv (or the test value leaves it unset): {argv:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn security_and_shutdown_flags_round_trip() {
        assert_round_trip(&crate::ServerSecurityArgs {
            tls_cert: Some(PathBuf::from("/s/server.pem")),
            tls_key: Some(PathBuf::from("/s/server key.pem")),
            auth_tokens: Some(PathBuf::from("/s/tokens.txt")),
            insecure: true,
        });
        assert_round_trip(&crate::ClientSecurityArgs {
            tls_ca: Some(PathBuf::from("/s/ca.pem")),
            token_file: Some(PathBuf::from("/s/actor.token")),
            token: Some("abc".into()),
            tls_domain: Some("replay".into()),
        });
        assert_round_trip(&crate::ShutdownArgs {
            shutdown_timeout_secs: 7,
        });
    }
}
