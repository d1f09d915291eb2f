//! The authorization middleware: a tower [`Layer`] for `tonic::transport::Server::layer` that
//! checks every request's `authorization: Bearer <token>` against the token table and the
//! [`Policy`] before the request reaches a handler.
//!
//! It sits below tonic's routing, on plain HTTP requests, so one layer covers every service of
//! a server (and services added later) without each handler remembering to check. A refusal is
//! a proper gRPC answer (HTTP 200, trailers-only `grpc-status`), so clients see
//! `UNAUTHENTICATED` / `PERMISSION_DENIED` rather than a transport error. An accepted request
//! carries its [`Role`] in the request extensions (`request.extensions().get::<Role>()` in a
//! handler).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, Request, Response};
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

use crate::role::{Access, Policy};
use crate::tokens::TokenTable;
use crate::Role;

#[derive(Debug)]
enum Mode {
    /// `--insecure`: everything passes.
    Insecure,
    Enforce {
        tokens: TokenTable,
        policy: Policy,
    },
}

/// The authorization layer; cheap to clone (shared state).
#[derive(Clone, Debug)]
pub struct AuthLayer {
    mode: Arc<Mode>,
}

impl AuthLayer {
    /// Checks tokens from `tokens` against `policy`.
    pub fn new(tokens: TokenTable, policy: Policy) -> Self {
        AuthLayer {
            mode: Arc::new(Mode::Enforce { tokens, policy }),
        }
    }

    /// Lets every request through (the `--insecure` mode).
    pub fn insecure() -> Self {
        AuthLayer {
            mode: Arc::new(Mode::Insecure),
        }
    }

    /// The decision for one request: `Ok(Some(role))` for an authenticated caller,
    /// `Ok(None)` for an open method (or insecure mode), `Err` with the gRPC status to answer.
    pub fn authorize(&self, path: &str, headers: &HeaderMap) -> Result<Option<Role>, Status> {
        let Mode::Enforce { tokens, policy } = &*self.mode else {
            return Ok(None);
        };
        let allowed = match policy(path) {
            Access::Open => return Ok(None),
            Access::Roles(roles) => roles,
        };
        let token = bearer_token(headers)?;
        let Some(role) = tokens.lookup(token) else {
            return Err(Status::unauthenticated("unknown credentials"));
        };
        if allowed.contains(&role) {
            return Ok(Some(role));
        }
        Err(if allowed.is_empty() {
            Status::permission_denied(format!(
                "role `{role}` may not call {path}: this server allows it to no role"
            ))
        } else {
            let names: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
            Status::permission_denied(format!(
                "role `{role}` may not call {path} (allowed: {})",
                names.join(", ")
            ))
        })
    }
}

/// The token of an `authorization: Bearer <token>` header, or the `UNAUTHENTICATED` answer.
fn bearer_token(headers: &HeaderMap) -> Result<&str, Status> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(Status::unauthenticated(
            "missing `authorization: Bearer <token>` metadata \
             (clients pass --token-file or HINDSIGHT_TOKEN_FILE)",
        ));
    };
    if values.next().is_some() {
        return Err(Status::unauthenticated(
            "more than one `authorization` metadata entry",
        ));
    }
    let malformed =
        || Status::unauthenticated("malformed `authorization` metadata: expected `Bearer <token>`");
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
    // RFC 6750: the scheme name is case-insensitive.
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(malformed());
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(malformed());
    }
    Ok(token)
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around a server's routes.
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        match self.layer.authorize(req.uri().path(), req.headers()) {
            Ok(role) => {
                if let Some(role) = role {
                    req.extensions_mut().insert(role);
                }
                // The service that was polled ready is the one that must be called; leave a
                // fresh clone in its place for the next request.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
            }
            Err(status) => {
                tracing::debug!(
                    path = req.uri().path(),
                    code = ?status.code(),
                    reason = status.message(),
                    "request refused"
                );
                let response = status.into_http::<ResBody>();
                Box::pin(std::future::ready(Ok(response)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::default_policy;
    use tonic::Code;

    const ACTOR: &str = "actor-token-0123456789";
    const LEARNER: &str = "learner-token-0123456789";

    fn layer() -> AuthLayer {
        let table = TokenTable::parse(&format!("actor {ACTOR}\nlearner {LEARNER}\n")).unwrap();
        AuthLayer::new(table, default_policy)
    }

    fn headers(auth: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in auth {
            h.append(http::header::AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn decisions() {
        let l = layer();
        let lease = "/hindsight.v1.Replay/LeasePrompts";
        let check = |path: &str, auth: &[&str]| l.authorize(path, &headers(auth));

        assert_eq!(
            check(lease, &[&format!("Bearer {ACTOR}")]).unwrap(),
            Some(Role::Actor)
        );
        assert_eq!(
            check(lease, &[&format!("bearer  {ACTOR} ")]).unwrap(),
            Some(Role::Actor)
        );
        assert_eq!(check("/grpc.health.v1.Health/Check", &[]).unwrap(), None);

        let refused = |path: &str, auth: &[&str]| check(path, auth).unwrap_err();
        let s = refused(lease, &[]);
        assert_eq!(s.code(), Code::Unauthenticated);
        assert!(
            s.message().contains("missing `authorization"),
            "{}",
            s.message()
        );
        for garbled in [ACTOR, "Basic abc", "Bearer", "Bearer  ", "Token x"] {
            let s = refused(lease, &[garbled]);
            assert_eq!(s.code(), Code::Unauthenticated, "{garbled}");
            assert!(
                s.message().contains("malformed"),
                "{garbled}: {}",
                s.message()
            );
        }
        let two = [format!("Bearer {ACTOR}"), format!("Bearer {ACTOR}")];
        let s = refused(lease, &[&two[0], &two[1]]);
        assert_eq!(s.code(), Code::Unauthenticated);
        let s = refused(lease, &["Bearer not-a-known-token-at-all"]);
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unauthenticated, "unknown credentials")
        );
        let s = refused(lease, &[&format!("Bearer {LEARNER}")]);
        assert_eq!(s.code(), Code::PermissionDenied);
        assert!(
            s.message().contains("`learner`") && s.message().contains(lease),
            "{}",
            s.message()
        );
        let s = refused(
            "/hindsight.v1.Weights/Publish",
            &[&format!("Bearer {LEARNER}")],
        );
        assert_eq!(s.code(), Code::PermissionDenied);
        assert!(s.message().contains("no role"), "{}", s.message());
        // Messages never echo the token.
        assert!(!s.message().contains(LEARNER));

        let open = AuthLayer::insecure();
        assert_eq!(open.authorize(lease, &HeaderMap::new()).unwrap(), None);
        assert_eq!(open.authorize("/x.Y/Z", &HeaderMap::new()).unwrap(), None);
    }
}
