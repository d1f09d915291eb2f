//! [`ConfigError`]: an error the operator fixes by changing the configuration (a bad address,
//! an unreadable model, flags that do not fit together, missing TLS material), as opposed to
//! one that happens while running. `hindsight` prints either as one line; a configuration
//! error exits with code 2 (like a command-line usage error), anything else with 1.

/// A configuration error; wraps the error with its context (displayed as one line).
#[derive(Debug)]
pub struct ConfigError(pub anyhow::Error);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// Marks `e` as a configuration error.
    pub fn wrap(e: impl Into<anyhow::Error>) -> anyhow::Error {
        anyhow::Error::new(ConfigError(e.into()))
    }

    /// Whether `e` (or anything in its chain) is a configuration error.
    pub fn is_in(e: &anyhow::Error) -> bool {
        e.chain().any(|c| c.is::<ConfigError>())
    }
}

/// `.config_err()` on a `Result`: marks its error as a [`ConfigError`].
pub trait ConfigResultExt<T> {
    fn config_err(self) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> ConfigResultExt<T> for Result<T, E> {
    fn config_err(self) -> anyhow::Result<T> {
        self.map_err(ConfigError::wrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn found_under_context_and_shown_on_one_line() {
        let e: anyhow::Result<()> = Err(anyhow::anyhow!("no such file"))
            .context("reading --tls-cert x.pem")
            .config_err();
        let e = e.context("starting the replay server").unwrap_err();
        assert!(ConfigError::is_in(&e));
        assert_eq!(
            format!("{e:#}"),
            "starting the replay server: reading --tls-cert x.pem: no such file"
        );
        assert!(!ConfigError::is_in(&anyhow::anyhow!("disk full")));
    }
}
