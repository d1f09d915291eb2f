//! Device names on the command line (`cpu`, `cuda`, `cuda:N`) turned into candle devices,
//! with an error that says what is missing when this binary has no CUDA backend.

use anyhow::Context;
use candle_core::Device;

/// Parses `cpu`, `cuda` (GPU 0) or `cuda:N`.
pub fn parse_device(name: &str) -> anyhow::Result<Device> {
    match name.trim() {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .with_context(|| format!("device {s:?}: {n:?} is not a GPU index"))?,
                None => 0,
            };
            Device::new_cuda(ordinal).with_context(|| {
                format!(
                    "device {s}: this binary needs `--features cuda` (scripts/cuda-toolchain.sh) and an NVIDIA GPU"
                )
            })
        }
        other => anyhow::bail!("unknown device {other:?} (cpu, cuda, cuda:N)"),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_device;

    #[test]
    fn device_names_parse_or_say_what_is_wrong() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("unknown device") && e.contains("cuda:N"), "{e}");
        let e = format!("{:#}", parse_device("cuda:x").unwrap_err());
        assert!(e.contains("not a GPU index"), "{e}");
        // Without the CUDA backend (the default build) a GPU device is refused with the
        // way to get one; with it, a missing GPU is an error too, never a panic.
        if let Err(e) = parse_device("cuda:0") {
            let e = format!("{e:#}");
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
