//! The server's token table (`--auth-tokens FILE`): which bearer token belongs to which role.
//!
//! File format, one credential a line: `ROLE TOKEN` (`actor 3f9c...`); `#` starts a comment
//! (whole line or trailing); blank lines are ignored. A role may have several tokens (rotation:
//! add the new one, move clients, drop the old one). Tokens are at least 16 characters of
//! letters, digits and `-._~+/=` (hex and base64 fit), so they survive as HTTP header values.
//!
//! Only SHA-256 digests of the tokens are kept in memory, and a presented token is compared
//! with every entry in constant time, so neither response timing nor a memory dump reveals a
//! token.

use std::path::Path;

use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::role::{ParseRoleError, Role};

/// Shortest token a server accepts (`hindsight certs` writes 64 hex characters).
pub const MIN_TOKEN_CHARS: usize = 16;

/// Why a token string is not acceptable (never contains the token itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    #[error("token is empty")]
    Empty,
    #[error("token is {0} characters; tokens must be at least {MIN_TOKEN_CHARS}")]
    TooShort(usize),
    #[error("token has a character other than letters, digits and `-._~+/=`")]
    BadCharacter,
}

/// Checks that `token` could be a credential: long enough and safe in an HTTP header.
pub fn check_token(token: &str) -> Result<(), TokenProblem> {
    if token.is_empty() {
        return Err(TokenProblem::Empty);
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
    {
        return Err(TokenProblem::BadCharacter);
    }
    if token.len() < MIN_TOKEN_CHARS {
        return Err(TokenProblem::TooShort(token.len()));
    }
    Ok(())
}

/// A token file that cannot be used; every variant names the offending line (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFileError {
    #[error("line {line}: expected `ROLE TOKEN` (e.g. `actor 3f9c...`), found {fields} field(s)")]
    Fields { line: usize, fields: usize },
    #[error("line {line}: {source}")]
    Role {
        line: usize,
        #[source]
        source: ParseRoleError,
    },
    #[error("line {line}: {source}")]
    Token {
        line: usize,
        #[source]
        source: TokenProblem,
    },
    #[error("line {line}: the same token as line {first}; each token must belong to one role")]
    Duplicate { line: usize, first: usize },
    #[error("no tokens in the file (only comments and blank lines)")]
    Empty,
}

/// Digests of the accepted tokens and the role each one grants.
#[derive(Clone)]
pub struct TokenTable {
    entries: Vec<([u8; 32], Role)>,
}

impl std::fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Roles only: even digests of secrets stay out of logs.
        let roles: Vec<Role> = self.entries.iter().map(|(_, r)| *r).collect();
        f.debug_struct("TokenTable").field("roles", &roles).finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

impl TokenTable {
    /// Parses the text of a token file (format in the module docs).
    pub fn parse(text: &str) -> Result<Self, TokenFileError> {
        let mut entries: Vec<([u8; 32], Role)> = Vec::new();
        let mut lines_of: Vec<usize> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("");
            let fields: Vec<&str> = content.split_whitespace().collect();
            if fields.is_empty() {
                continue;
            }
            let [role, token] = fields[..] else {
                return Err(TokenFileError::Fields {
                    line,
                    fields: fields.len(),
                });
            };
            let role = role
                .parse::<Role>()
                .map_err(|source| TokenFileError::Role { line, source })?;
            check_token(token).map_err(|source| TokenFileError::Token { line, source })?;
            let d = digest(token);
            if let Some(k) = entries.iter().position(|(e, _)| *e == d) {
                return Err(TokenFileError::Duplicate {
                    line,
                    first: lines_of[k],
                });
            }
            entries.push((d, role));
            lines_of.push(line);
        }
        if entries.is_empty() {
            return Err(TokenFileError::Empty);
        }
        Ok(TokenTable { entries })
    }

    /// Reads and parses a token file; errors name the file and the line.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --auth-tokens {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in --auth-tokens {}", path.display()))
    }

    /// The role a presented token grants, if any. Every entry is compared, in constant time.
    pub fn lookup(&self, token: &str) -> Option<Role> {
        let presented = digest(token);
        let mut found = None;
        for (d, role) in &self.entries {
            if constant_time_eq(d, &presented) {
                found = Some(*role);
            }
        }
        found
    }

    /// How many tokens each role has (for the startup log line).
    pub fn count(&self, role: Role) -> usize {
        self.entries.iter().filter(|(_, r)| *r == role).count()
    }

    /// Number of tokens in the table.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no tokens (a parsed table never is).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const L: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_roles_comments_blank_lines_and_several_tokens_per_role() {
        let text = format!(
            "# cluster tokens\n\n  actor {A}   # the actors\nlearner\t{L}\nactor Zm9vYmFyYmF6cXV4cXV1eA==\n"
        );
        let t = TokenTable::parse(&text).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup(A), Some(Role::Actor));
        assert_eq!(t.lookup(L), Some(Role::Learner));
        assert_eq!(t.lookup("Zm9vYmFyYmF6cXV4cXV1eA=="), Some(Role::Actor));
        assert_eq!(t.count(Role::Actor), 2);
        assert_eq!(t.count(Role::Status), 0);
        // Near misses are not matches.
        assert_eq!(t.lookup(&A[1..]), None);
        assert_eq!(t.lookup(&format!("{A}a")), None);
        assert_eq!(t.lookup(""), None);
        // Debug shows roles, never tokens or digests.
        let dbg = format!("{t:?}");
        assert!(!dbg.contains(A) && dbg.contains("Actor"), "{dbg}");
    }

    #[test]
    fn malformed_lines_are_refused_with_their_line_number() {
        let cases: Vec<(String, TokenFileError, &str)> = vec![
            (
                format!("# c\n\nactor {A} extra\n"),
                TokenFileError::Fields { line: 3, fields: 3 },
                "line 3: expected `ROLE TOKEN`",
            ),
            (
                format!("actor {A}\n{L}\n"),
                TokenFileError::Fields { line: 2, fields: 1 },
                "line 2",
            ),
            (
                format!("actor {A}\nadmin {L}\n"),
                TokenFileError::Role {
                    line: 2,
                    source: ParseRoleError("admin".into()),
                },
                "line 2: unknown role \"admin\"",
            ),
            (
                "\nstatus shorttoken\n".to_string(),
                TokenFileError::Token {
                    line: 2,
                    source: TokenProblem::TooShort(10),
                },
                "line 2: token is 10 characters; tokens must be at least 16",
            ),
            (
                "status aaaaaaaaaaaaaaaaaaaa\"bb\n".to_string(),
                TokenFileError::Token {
                    line: 1,
                    source: TokenProblem::BadCharacter,
                },
                "line 1: token has a character",
            ),
            (
                format!("actor {A}\n\nlearner {A}\n"),
                TokenFileError::Duplicate { line: 3, first: 1 },
                "line 3: the same token as line 1",
            ),
            (
                "# nothing\n\n   \n".to_string(),
                TokenFileError::Empty,
                "no tokens",
            ),
        ];
        for (text, want, message) in cases {
            let err = TokenTable::parse(&text).unwrap_err();
            assert_eq!(err, want, "for {text:?}");
            let shown = err.to_string();
            assert!(shown.contains(message), "{shown:?} lacks {message:?}");
            // An error never echoes a token.
            assert!(!shown.contains(A) && !shown.contains(L), "{shown}");
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.txt");
        std::fs::write(&path, "actor x\n").unwrap();
        let err = format!("{:#}", TokenTable::load(&path).unwrap_err());
        assert!(
            err.contains("tokens.txt") && err.contains("line 1"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            TokenTable::load(&dir.path().join("nope")).unwrap_err()
        );
        assert!(
            err.contains("reading --auth-tokens") && err.contains("nope"),
            "{err}"
        );
    }

    #[test]
    fn check_token_rules() {
        assert_eq!(check_token(""), Err(TokenProblem::Empty));
        assert_eq!(check_token("abc"), Err(TokenProblem::TooShort(3)));
        assert_eq!(
            check_token("abcdefghijklmnop qr"),
            Err(TokenProblem::BadCharacter)
        );
        assert_eq!(
            check_token("abcdefghijklmnop#"),
            Err(TokenProblem::BadCharacter)
        );
        assert_eq!(check_token(A), Ok(()));
        assert_eq!(check_token("a-b.c_d~e+f/g=hijkl"), Ok(()));
    }
}
