//! Everything a secured cluster needs, generated in one step (`hindsight certs`): a private CA,
//! one server certificate for every service name, and one random bearer token per role plus
//! the server's token table.
//!
//! One server certificate serves every role's server (replay server, learner), so a compose
//! file or a local cluster mounts one directory. Private keys and tokens are written with mode
//! 0600, created fresh (never by opening an existing file that might be readable by others).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::TryRngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::Role;

/// The CA certificate clients trust (`--tls-ca`).
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key (only needed to sign more certificates).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The servers' certificate (`--tls-cert`).
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The servers' private key (`--tls-key`).
pub const SERVER_KEY_FILE: &str = "server-key.pem";
/// The servers' token table (`--auth-tokens`).
pub const TOKENS_FILE: &str = "tokens.txt";

/// Names every server certificate is valid for, besides those asked for.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// Lifetime of the CA and of the server certificate.
const CA_DAYS: i64 = 10 * 365;
const SERVER_DAYS: i64 = 2 * 365;

/// Writes a CA, a server certificate valid for `localhost`, `127.0.0.1`, `::1` and every name
/// in `names` (DNS names or IP addresses), one token file per role (`actor.token`, ...) and
/// `tokens.txt`, into `out_dir` (created if needed). Refuses a non-empty `out_dir` unless
/// `force`. Returns the paths written.
pub fn make_certs(out_dir: &Path, names: &[String], force: bool) -> Result<Vec<PathBuf>> {
    if let Ok(mut entries) = std::fs::read_dir(out_dir) {
        if entries.next().is_some() && !force {
            bail!(
                "{} is not empty; pass --force to overwrite the certificates and tokens in it",
                out_dir.display()
            );
        }
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let now = OffsetDateTime::now_utc();
    // A day of slack for machines whose clocks run behind.
    let not_before = now - Duration::days(1);

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::default();
    // A name of its own per CA: a client trusting another cluster's CA then fails with
    // "unknown issuer" rather than a puzzling "bad signature" from a same-named CA.
    let ca_serial = serial()?;
    ca_params.distinguished_name = name(&format!(
        "Hindsight cluster CA {}",
        hex::encode(&ca_serial.as_ref()[..4])
    ));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.serial_number = Some(ca_serial);
    ca_params.not_before = not_before;
    ca_params.not_after = now + Duration::days(CA_DAYS);
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("signing the CA certificate")?;
    let ca = Issuer::new(ca_params, &ca_key);

    let mut sans: Vec<String> = LOCAL_NAMES.iter().map(|s| s.to_string()).collect();
    for n in names {
        let n = n.trim();
        if n.is_empty() {
            bail!("an empty --name");
        }
        if n.parse::<std::net::IpAddr>().is_err() && !is_dns_name(n) {
            bail!("--name {n:?} is neither an IP address nor a DNS name (letters, digits, `-`, `_`, dots)");
        }
        if !sans.iter().any(|s| s == n) {
            sans.push(n.to_string());
        }
    }
    let server_key = KeyPair::generate().context("generating the server key")?;
    let mut server_params = CertificateParams::new(sans.clone())
        .with_context(|| format!("server names {sans:?}: not valid DNS names or IP addresses"))?;
    server_params.distinguished_name = name("Hindsight server");
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.serial_number = Some(serial()?);
    server_params.not_before = not_before;
    server_params.not_after = now + Duration::days(SERVER_DAYS);
    let server_cert = server_params
        .signed_by(&server_key, &ca)
        .context("signing the server certificate")?;

    let mut written = Vec::new();
    let mut write = |file: &str, contents: &str, secret: bool| -> Result<()> {
        let path = out_dir.join(file);
        write_file(&path, contents.as_bytes(), secret)?;
        written.push(path);
        Ok(())
    };
    write(CA_CERT_FILE, &ca_cert.pem(), false)?;
    write(CA_KEY_FILE, &ca_key.serialize_pem(), true)?;
    write(SERVER_CERT_FILE, &server_cert.pem(), false)?;
    write(SERVER_KEY_FILE, &server_key.serialize_pem(), true)?;
    let mut table = String::from(
        "# Hindsight token table (--auth-tokens): `ROLE TOKEN` per line.\n\
         # A role may have several tokens; remove a line to revoke it.\n",
    );
    for role in Role::ALL {
        let token = random_token()?;
        write(&format!("{role}.token"), &format!("{token}\n"), true)?;
        table.push_str(&format!("{role} {token}\n"));
    }
    write(TOKENS_FILE, &table, true)?;
    Ok(written)
}

/// A host name a certificate can carry: dot-separated labels of 1-63 letters, digits, `-`
/// and `_` (compose service names may have underscores), not starting or ending with `-`.
fn is_dns_name(n: &str) -> bool {
    n.len() <= 253
        && n.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Hindsight");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A random positive 127-bit serial number (RFC 5280 asks for unique, at most 20 octets).
fn serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .context("reading the OS random number generator")?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

/// 32 bytes from the OS random number generator, as 64 hex characters.
fn random_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .context("reading the OS random number generator")?;
    Ok(hex::encode(bytes))
}

/// Writes a file created fresh: secrets with mode 0600 from the start, so there is no moment
/// when they are readable by others (an existing file is removed first, not truncated, since
/// opening it would keep its old, maybe wider, permissions).
fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the old {}", path.display())),
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TokenTable;

    #[test]
    fn writes_everything_with_private_files_private() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let written =
            make_certs(&out, &["replay-server".into(), "10.0.0.7".into()], false).unwrap();
        let mut names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "actor.token",
                "ca-key.pem",
                "ca.pem",
                "learner.token",
                "server-key.pem",
                "server.pem",
                "status.token",
                "tokens.txt"
            ]
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for p in &written {
                let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
                let name = p.file_name().unwrap().to_string_lossy();
                let public = name == "ca.pem" || name == "server.pem";
                assert_eq!(mode, if public { 0o644 } else { 0o600 }, "{name}: {mode:o}");
            }
        }
        // The table grants each role file's token to that role, and the tokens differ.
        let table = TokenTable::load(&out.join(TOKENS_FILE)).unwrap();
        assert_eq!(table.len(), 3);
        let mut tokens = Vec::new();
        for role in Role::ALL {
            let token = std::fs::read_to_string(out.join(format!("{role}.token"))).unwrap();
            let token = token.trim().to_string();
            assert_eq!(token.len(), 64);
            assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
            assert_eq!(table.lookup(&token), Some(role));
            tokens.push(token);
        }
        let distinct: std::collections::HashSet<&String> = tokens.iter().collect();
        assert_eq!(distinct.len(), 3);
        let pem = std::fs::read_to_string(out.join(SERVER_CERT_FILE)).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    }

    #[test]
    fn refuses_a_non_empty_directory_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        make_certs(dir.path(), &[], false).unwrap();
        let old = std::fs::read_to_string(dir.path().join("actor.token")).unwrap();
        let err = make_certs(dir.path(), &[], false).unwrap_err().to_string();
        assert!(
            err.contains("not empty") && err.contains("--force"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("actor.token")).unwrap(),
            old
        );

        make_certs(dir.path(), &[], true).unwrap();
        let new = std::fs::read_to_string(dir.path().join("actor.token")).unwrap();
        assert_ne!(new, old, "--force writes new tokens");

        // An unrelated file also makes the directory non-empty.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("notes.txt"), "x").unwrap();
        assert!(make_certs(other.path(), &[], false).is_err());
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!(
            "{:#}",
            make_certs(dir.path(), &["bad name!".into()], false).unwrap_err()
        );
        assert!(err.contains("bad name!"), "{err}");
        let err = format!(
            "{:#}",
            make_certs(dir.path(), &[" ".into()], true).unwrap_err()
        );
        assert!(err.contains("empty --name"), "{err}");
        for bad in ["-lead", "a..b", "trail-.x", "sp ace"] {
            assert!(
                make_certs(dir.path(), &[bad.into()], true).is_err(),
                "{bad}"
            );
        }
        // Nothing was written by the refused calls.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(is_dns_name("replay_server") && is_dns_name("a.b-c.example"));
    }
}
