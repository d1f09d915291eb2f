//! Who may call what: the [`Role`]s a token can carry and the [`Policy`] mapping each gRPC
//! method to the roles allowed to call it. Kept apart from the middleware so the table can be
//! read (and reviewed) on its own: it is the security boundary of the cluster.

use std::fmt;
use std::str::FromStr;

/// What a credential is allowed to be. Every token in the server's table names one role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Leases prompts and streams rollouts; reads weights.
    Actor,
    /// Consumes training batches; reads weights.
    Learner,
    /// Read-only observer (`hindsight status`, dashboards): status and weight manifests.
    Status,
}

impl Role {
    /// Every role, in the order tokens are written by `hindsight certs`.
    pub const ALL: [Role; 3] = [Role::Actor, Role::Learner, Role::Status];

    /// The role's name in token files, flags and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Actor => "actor",
            Role::Learner => "learner",
            Role::Status => "status",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of `actor`, `learner`, `status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?} (expected actor, learner or status)")]
pub struct ParseRoleError(pub String);

impl FromStr for Role {
    type Err = ParseRoleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "actor" => Ok(Role::Actor),
            "learner" => Ok(Role::Learner),
            "status" => Ok(Role::Status),
            other => Err(ParseRoleError(other.to_string())),
        }
    }
}

/// Who may call one gRPC method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without credentials (health probes carry none).
    Open,
    /// Holders of a token of one of these roles; an empty list denies everybody.
    Roles(&'static [Role]),
}

/// Maps a gRPC path (`/package.Service/Method`) to who may call it.
pub type Policy = fn(&str) -> Access;

/// Hindsight's access table. Anything not listed is denied to every role, so a method added
/// to the protocol stays closed until someone decides who may call it.
pub fn default_policy(path: &str) -> Access {
    use Role::*;
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return Access::Roles(&[]);
    };
    // A method is one path segment; anything longer is not a gRPC call we serve.
    if method.is_empty() || method.contains('/') {
        return Access::Roles(&[]);
    }
    match (service, method) {
        // Probes carry no credentials, and health says nothing secret.
        ("grpc.health.v1.Health", _) => Access::Open,
        (
            "hindsight.v1.Replay",
            "LeasePrompts" | "RenewLeases" | "ReleaseLeases" | "StreamRollouts",
        ) => Access::Roles(&[Actor]),
        (
            "hindsight.v1.Replay",
            "StreamBatches" | "AckBatch" | "RegisterLearner" | "CommitBatches",
        ) => Access::Roles(&[Learner]),
        ("hindsight.v1.Replay", "Status") => Access::Roles(&[Status, Actor, Learner]),
        ("hindsight.v1.Weights", "Latest") => Access::Roles(&[Actor, Learner, Status]),
        ("hindsight.v1.Weights", "Fetch") => Access::Roles(&[Actor, Learner]),
        ("hindsight.v1.Weights", "Model") => Access::Roles(&[Actor, Learner, Status]),
        _ => Access::Roles(&[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_round_trip_and_unknown_names_are_refused() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
            assert_eq!(role.to_string(), role.as_str());
        }
        let err = "Actor".parse::<Role>().unwrap_err().to_string();
        assert!(
            err.contains("\"Actor\"") && err.contains("learner"),
            "{err}"
        );
    }

    #[test]
    fn default_policy_matches_the_table() {
        use Role::*;
        let cases: &[(&str, Access)] = &[
            ("/grpc.health.v1.Health/Check", Access::Open),
            ("/grpc.health.v1.Health/Watch", Access::Open),
            // The old hindsight.v1.Health is gone: not open any more.
            ("/hindsight.v1.Health/Check", Access::Roles(&[])),
            ("/hindsight.v1.Replay/LeasePrompts", Access::Roles(&[Actor])),
            ("/hindsight.v1.Replay/RenewLeases", Access::Roles(&[Actor])),
            (
                "/hindsight.v1.Replay/ReleaseLeases",
                Access::Roles(&[Actor]),
            ),
            (
                "/hindsight.v1.Replay/StreamRollouts",
                Access::Roles(&[Actor]),
            ),
            (
                "/hindsight.v1.Replay/StreamBatches",
                Access::Roles(&[Learner]),
            ),
            ("/hindsight.v1.Replay/AckBatch", Access::Roles(&[Learner])),
            (
                "/hindsight.v1.Replay/RegisterLearner",
                Access::Roles(&[Learner]),
            ),
            (
                "/hindsight.v1.Replay/CommitBatches",
                Access::Roles(&[Learner]),
            ),
            (
                "/hindsight.v1.Replay/Status",
                Access::Roles(&[Status, Actor, Learner]),
            ),
            (
                "/hindsight.v1.Weights/Latest",
                Access::Roles(&[Actor, Learner, Status]),
            ),
            (
                "/hindsight.v1.Weights/Fetch",
                Access::Roles(&[Actor, Learner]),
            ),
            (
                "/hindsight.v1.Weights/Model",
                Access::Roles(&[Actor, Learner, Status]),
            ),
            // Not listed: closed to everybody.
            ("/hindsight.v1.Weights/Publish", Access::Roles(&[])),
            ("/hindsight.v1.Replay/Drop", Access::Roles(&[])),
            ("/grpc.reflection.v1.ServerReflection/X", Access::Roles(&[])),
            ("/", Access::Roles(&[])),
            ("", Access::Roles(&[])),
            ("/grpc.health.v1.Health", Access::Roles(&[])),
            ("/grpc.health.v1.Health/", Access::Roles(&[])),
            // Extra segments do not ride on an open service's access.
            (
                "/grpc.health.v1.Health/../hindsight.v1.Replay/LeasePrompts",
                Access::Roles(&[]),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(default_policy(path), *want, "path {path:?}");
        }
    }
}
