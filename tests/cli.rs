//! The `saev` binary end to end.

use std::path::Path;
use std::process::Command;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/backbone")
}

#[test]
fn record_prints_shapes_and_norms() {
    let out = Command::new(env!("CARGO_BIN_EXE_saev"))
        .arg("record")
        .arg("--model")
        .arg(fixtures().join("tiny-dinov2-reg"))
        .args(["--size", "16", "--layers", "-1,0"])
        .arg(fixtures().join("astronaut.png"))
        .arg(fixtures().join("chelsea.png"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // 2 images, 2 layers, CLS + 4x4 patches (registers dropped), d_model 32.
    assert!(stdout.contains("[2, 2, 17, 32]"), "{stdout}");
    assert!(
        stdout.contains("layer  -1") && stdout.contains("layer   0"),
        "{stdout}"
    );
    assert!(stderr.contains("registers=3 (dropped)"), "{stderr}");
}

#[test]
fn bad_layer_is_a_clear_error_and_exit_code() {
    let out = Command::new(env!("CARGO_BIN_EXE_saev"))
        .arg("record")
        .arg("--model")
        .arg(fixtures().join("tiny-dinov2"))
        .args(["--size", "16", "--layers", "9"])
        .arg(fixtures().join("astronaut.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: layer 9 is out of range"),
        "{stderr}"
    );
}
