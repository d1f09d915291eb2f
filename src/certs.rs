//! `hindsight certs`: writes a private CA, a server certificate and per-role tokens
//! (`hindsight_service::make_certs`) and says which flags each role needs, so securing a
//! cluster is one command followed by copying the printed flags.

use std::path::PathBuf;

use anyhow::Result;
use hindsight_service::{make_certs, CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE, TOKENS_FILE};

#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// Directory to write into (created if needed; must be empty unless --force).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A name the server certificate must be valid for besides localhost, 127.0.0.1 and ::1
    /// (a compose service name, a host name, an IP address); repeat for several.
    #[arg(long = "name", value_name = "NAME")]
    pub names: Vec<String>,
    /// Overwrite certificates and tokens already in --out (clients holding the old ones stop
    /// working).
    #[arg(long, conflicts_with = "keep_existing")]
    pub force: bool,
    /// Keep the certificates and tokens already in --out when they are all there (exit 0
    /// without writing): for a one-shot container that runs on every `up`. A directory with
    /// only some of them is still refused.
    #[arg(long)]
    pub keep_existing: bool,
}

/// Every file `make_certs` writes, to decide whether --keep-existing may keep a directory.
fn complete(out: &std::path::Path) -> bool {
    let roles = hindsight_service::Role::ALL
        .iter()
        .map(|r| format!("{}.token", r.as_str()));
    [CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE, TOKENS_FILE]
        .into_iter()
        .map(String::from)
        .chain(roles)
        .all(|name| out.join(name).is_file())
}

pub fn run(args: CertsArgs) -> Result<()> {
    if args.keep_existing && complete(&args.out) {
        println!(
            "kept the certificates and tokens already in {}",
            args.out.display()
        );
        return Ok(());
    }
    let written = make_certs(&args.out, &args.names, args.force)?;
    println!("wrote into {}:", args.out.display());
    for path in &written {
        println!("  {}", path.display());
    }
    let f = |name: &str| args.out.join(name).display().to_string();
    let server = format!(
        "--tls-cert {} --tls-key {} --auth-tokens {}",
        f(SERVER_CERT_FILE),
        f(SERVER_KEY_FILE),
        f(TOKENS_FILE)
    );
    let client = |role: &str| {
        format!(
            "--tls-ca {} --token-file {}",
            f(CA_CERT_FILE),
            f(&format!("{role}.token"))
        )
    };
    println!();
    println!("servers (replay-server, learner): {server}");
    println!("actor:   {} (and https:// URLs)", client("actor"));
    println!("learner: {} (and https:// URLs)", client("learner"));
    println!("status:  {} (and https:// URLs)", client("status"));
    println!(
        "Private keys and tokens are mode 0600; {} and {} stay with the servers.",
        f("ca-key.pem"),
        f(TOKENS_FILE)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        certs: CertsArgs,
    }

    #[test]
    fn parses_repeated_names_and_writes_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let cli = Cli::try_parse_from([
            "certs",
            "--out",
            out.to_str().unwrap(),
            "--name",
            "replay-server",
            "--name",
            "learner",
        ])
        .unwrap();
        assert_eq!(cli.certs.names, ["replay-server", "learner"]);
        assert!(!cli.certs.force);
        run(cli.certs).unwrap();
        for file in [
            CA_CERT_FILE,
            SERVER_CERT_FILE,
            SERVER_KEY_FILE,
            TOKENS_FILE,
            "actor.token",
        ] {
            assert!(out.join(file).is_file(), "{file} missing");
        }
        assert!(Cli::try_parse_from(["certs"]).is_err(), "--out is required");
    }
}
