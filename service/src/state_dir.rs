//! [`check_writable_dir`]: a role's state directory (the replay server's write-ahead log, the
//! learner's checkpoints) checked at start, so that a volume that is missing, read-only or
//! owned by another user is a configuration error the operator sees in the first second, not a
//! failure at the first checkpoint after minutes of training.

use std::path::Path;

use crate::ConfigError;

/// Creates `dir` (and its parents) if needed and proves that this process can create and remove
/// a file in it. Any failure is a [`ConfigError`] that names the flag, the directory and the
/// user the process runs as (containers run as a non-root user, and a bind mount or volume
/// owned by root is the usual cause).
pub fn check_writable_dir(flag: &str, dir: &Path) -> anyhow::Result<()> {
    probe(dir).map_err(|e| {
        ConfigError::wrap(anyhow::anyhow!(
            "{flag} {}: not a writable directory for uid {} ({e}); is its volume mounted, and \
             owned by that user?",
            dir.display(),
            current_uid(),
        ))
    })
}

fn probe(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".hindsight-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

#[cfg(unix)]
fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective uid (libc is not a dependency here).
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

#[cfg(not(unix))]
fn current_uid() -> u32 {
    u32::MAX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_missing_directory_and_leaves_nothing_behind() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("a/b");
        check_writable_dir("--data-dir", &dir)?;
        assert!(dir.is_dir());
        assert_eq!(
            std::fs::read_dir(&dir)?.count(),
            0,
            "the probe file was removed"
        );
        Ok(())
    }

    #[test]
    fn a_path_under_a_file_is_a_config_error_naming_flag_and_path() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x")?;
        let dir = file.join("wal");
        let e = check_writable_dir("--data-dir", &dir).unwrap_err();
        assert!(ConfigError::is_in(&e));
        let msg = format!("{e:#}");
        assert!(msg.starts_with("--data-dir "), "{msg}");
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(msg.contains("uid "), "{msg}");
        Ok(())
    }
}
