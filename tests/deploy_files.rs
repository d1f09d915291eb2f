//! The two ways to build the image agree: the tested one (deploy/docker/build-image.sh, FROM
//! scratch, no registry) and the multi-stage deploy/docker/Dockerfile for users with a
//! registry (which CI cannot build). Same user, working directory, environment, ports,
//! healthcheck, entrypoint and default command.

use std::path::Path;
use std::process::Command;

/// The runtime directives of the last stage of a Dockerfile, in order.
fn runtime_directives(text: &str) -> Vec<String> {
    let last_stage = text
        .rsplit_once("\nFROM ")
        .map(|(_, rest)| rest)
        .unwrap_or(text);
    last_stage
        .lines()
        .map(str::trim)
        .filter(|l| {
            [
                "USER ",
                "WORKDIR ",
                "ENV ",
                "EXPOSE ",
                "HEALTHCHECK ",
                "ENTRYPOINT ",
                "CMD ",
            ]
            .iter()
            .any(|d| l.starts_with(d))
        })
        .map(String::from)
        .collect()
}

#[test]
fn the_registry_dockerfile_matches_the_tested_image() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("deploy/docker/build-image.sh"))
        .arg("--print-dockerfile")
        .output()
        .expect("running deploy/docker/build-image.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tested = runtime_directives(&String::from_utf8(out.stdout).unwrap());
    let registry = runtime_directives(
        &std::fs::read_to_string(root.join("deploy/docker/Dockerfile")).unwrap(),
    );
    assert!(
        tested.iter().any(|l| l.starts_with("HEALTHCHECK ")),
        "{tested:?}"
    );
    assert!(
        tested.iter().any(|l| l.starts_with("USER 10001")),
        "{tested:?}"
    );
    assert_eq!(
        tested, registry,
        "deploy/docker/Dockerfile drifted from build-image.sh"
    );
}
