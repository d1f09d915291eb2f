//! Every security flag can come from its `HINDSIGHT_<FLAG>` variable, as deployments (compose,
//! Kubernetes) set them. One test in its own binary: it changes the process environment, which
//! would race with any other test parsing flags at the same time.

use std::path::PathBuf;

use clap::{CommandFactory, Parser};
use hindsight_service::{ClientSecurityArgs, ServerSecurityArgs};

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    server: ServerSecurityArgs,
    #[command(flatten)]
    client: ClientSecurityArgs,
}

#[test]
fn flags_come_from_hindsight_variables_and_flags_win() {
    let secret = "0123456789abcdef0123456789abcdef";
    let vars = [
        ("HINDSIGHT_TLS_CERT", "/certs/server.pem"),
        ("HINDSIGHT_TLS_KEY", "/certs/server-key.pem"),
        ("HINDSIGHT_AUTH_TOKENS", "/certs/tokens.txt"),
        ("HINDSIGHT_TLS_CA", "/certs/ca.pem"),
        ("HINDSIGHT_TOKEN_FILE", "/certs/actor.token"),
        ("HINDSIGHT_TOKEN", secret),
        ("HINDSIGHT_TLS_DOMAIN", "replay-server"),
        ("HINDSIGHT_INSECURE", "false"),
    ];
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
    let cli = Cli::try_parse_from(["x"]).unwrap();
    assert_eq!(
        cli.server,
        ServerSecurityArgs {
            tls_cert: Some(PathBuf::from("/certs/server.pem")),
            tls_key: Some(PathBuf::from("/certs/server-key.pem")),
            auth_tokens: Some(PathBuf::from("/certs/tokens.txt")),
            insecure: false,
        }
    );
    assert_eq!(cli.client.tls_ca, Some(PathBuf::from("/certs/ca.pem")));
    assert_eq!(
        cli.client.token_file,
        Some(PathBuf::from("/certs/actor.token"))
    );
    assert_eq!(cli.client.token.as_deref(), Some(secret));
    assert_eq!(cli.client.tls_domain.as_deref(), Some("replay-server"));

    // A flag on the command line wins over its variable.
    let cli = Cli::try_parse_from(["x", "--tls-cert", "/other.pem"]).unwrap();
    assert_eq!(cli.server.tls_cert, Some(PathBuf::from("/other.pem")));

    // --help shows where a value came from, but never the token's value.
    let help = Cli::command().render_long_help().to_string();
    assert!(help.contains("/certs/ca.pem"), "{help}");
    assert!(!help.contains(secret), "{help}");

    for (value, want) in [("true", true), ("false", false)] {
        std::env::set_var("HINDSIGHT_INSECURE", value);
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.server.insecure, want, "HINDSIGHT_INSECURE={value}");
    }
    // The switch that turns security off takes only `true` or `false`, like every boolean
    // HINDSIGHT_ variable: a typo is an error, not a guess.
    for value in ["1", "yes", "ture"] {
        std::env::set_var("HINDSIGHT_INSECURE", value);
        let err = Cli::try_parse_from(["x"]).unwrap_err().to_string();
        assert!(
            err.contains(value) && err.contains("true"),
            "{value}: {err}"
        );
    }
    for (k, _) in vars {
        std::env::remove_var(k);
    }
}
