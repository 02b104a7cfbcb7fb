//! Captures the git commit the binary is built from, for
//! `allocation_build_info{revision}` and the first log line of `run`.
//! `ALLOCATION_WORKER_REVISION` set at build time wins (a Docker build has no
//! `.git`: pass `--build-arg REVISION=$(git rev-parse --short HEAD)`); else
//! `git rev-parse --short HEAD`; else `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=ALLOCATION_WORKER_REVISION");
    let overridden = std::env::var("ALLOCATION_WORKER_REVISION")
        .ok()
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty());
    let revision = match overridden {
        Some(revision) => revision,
        None => {
            // Build again when HEAD moves: HEAD itself (a checkout), the
            // branch it names (a commit) and packed-refs. In a worktree, HEAD
            // is in its own git dir and the refs in the common one.
            // A path that does not exist would rerun this script on every
            // build: only existing ones are named.
            let mut watched = Vec::new();
            if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
                watched.push(format!("{dir}/HEAD"));
            }
            if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
                watched.push(format!("{common}/packed-refs"));
                if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                    watched.push(format!("{common}/{branch}"));
                }
            }
            for path in watched {
                if std::path::Path::new(&path).exists() {
                    println!("cargo:rerun-if-changed={path}");
                }
            }
            git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    println!("cargo:rustc-env=ALLOCATION_WORKER_REVISION={revision}");
}
