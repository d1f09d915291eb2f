//! The shutdown bound every role shares (`--shutdown-timeout-secs`): after SIGTERM a process
//! drains and exits within it. The default (20 s) stays below Kubernetes' default
//! `terminationGracePeriodSeconds` (30 s), so a pod is never killed mid-drain by default.

use std::time::Duration;

/// Default of `--shutdown-timeout-secs`.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 20;

/// The time between the drain ending inside a role and the hard bound: what is left for
/// giving back leases, closing the log, and the process exit itself.
const EXIT_MARGIN: Duration = Duration::from_secs(2);

/// The graceful-shutdown flag of every role.
#[derive(clap::Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownArgs {
    /// After SIGTERM (or Ctrl-C), the most seconds this process takes to drain and exit.
    /// Keep it below the orchestrator's grace period (Kubernetes: 30 s by default).
    #[arg(long, env = "HINDSIGHT_SHUTDOWN_TIMEOUT_SECS", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT_SECS)]
    pub shutdown_timeout_secs: u64,
}

impl Default for ShutdownArgs {
    fn default() -> Self {
        ShutdownArgs {
            shutdown_timeout_secs: DEFAULT_SHUTDOWN_TIMEOUT_SECS,
        }
    }
}

impl ShutdownArgs {
    /// The hard bound: the process has exited this long after the signal.
    pub fn bound(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs.max(1))
    }

    /// How long the role's own drain may run (finish work in progress, close streams) before
    /// it gives up on what is unfinished and cleans up: the bound less a margin for the
    /// clean-up and the exit, and at least half the bound.
    pub fn drain_bound(&self) -> Duration {
        let bound = self.bound();
        bound.saturating_sub(EXIT_MARGIN).max(bound / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_ends_before_the_bound() {
        let a = ShutdownArgs::default();
        assert_eq!(a.bound(), Duration::from_secs(20));
        assert_eq!(a.drain_bound(), Duration::from_secs(18));
        let short = ShutdownArgs {
            shutdown_timeout_secs: 1,
        };
        assert_eq!(short.drain_bound(), Duration::from_millis(500));
        let zero = ShutdownArgs {
            shutdown_timeout_secs: 0,
        };
        assert_eq!(zero.bound(), Duration::from_secs(1));
    }
}
