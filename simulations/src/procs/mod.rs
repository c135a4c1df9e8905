//! Supervision of the real binaries on loopback: children killed when dropped, free
//! ports, the admin endpoints (`/readyz`, `/status`) read with a tiny blocking HTTP GET,
//! and where to find `mesh-node`, `origin-connector` and `demo-origin`.
//!
//! Shared by the real-process simulator (`realnet`) and the end-to-end tests in `tests/`.
//! Blocking on purpose: callers in async code wrap the polls in `spawn_blocking`.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a process could not be started or an address found.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The OS refused to start the program.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The log file could not be created.
    #[error("cannot create log file {path}: {source}")]
    Log {
        /// The log path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// No free port could be bound.
    #[error("no free {0} port on 127.0.0.1: {1}")]
    NoPort(&'static str, std::io::Error),
    /// A binary is missing and could not be built.
    #[error("binary {name} not found beside {dir} and `cargo build` failed: {detail}")]
    MissingBinary {
        /// The binary's name.
        name: String,
        /// Where it was looked for.
        dir: String,
        /// What went wrong.
        detail: String,
    },
}

/// A running child process, killed (SIGKILL) and reaped on drop. Its stderr goes to a log
/// file. Started in its own process group, so a Ctrl-C in the terminal reaches only the
/// supervisor, which then stops its children in order.
#[derive(Debug)]
pub struct Proc {
    /// Name for messages.
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Starts `program args…` with stdout and stderr to `<log_dir>/<name>.log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[&str],
        log_dir: &Path,
    ) -> Result<Self, ProcError> {
        Self::spawn_with_env(name, program, args, log_dir, &[])
    }

    /// [`Proc::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[&str],
        log_dir: &Path,
        env: &[(&str, &str)],
    ) -> Result<Self, ProcError> {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).map_err(|source| ProcError::Log {
            path: log.display().to_string(),
            source,
        })?;
        let stdout = file.try_clone().map_or(Stdio::null(), Stdio::from);
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .env(
                "RUST_LOG",
                std::env::var("SKYLANE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            );
        own_process_group(&mut cmd);
        let child = cmd.spawn().map_err(|source| ProcError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
        Ok(Self {
            name: name.into(),
            child: Some(child),
            log,
        })
    }

    /// Wraps a child started elsewhere (e.g. with stdout piped to read a banner).
    pub fn from_child(name: &str, child: Child, log: PathBuf) -> Self {
        Self {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends SIGTERM (graceful drain).
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends SIGHUP (reload the config).
    pub fn hangup(&self) {
        self.signal("HUP");
    }

    /// Sends the signal named `name` (`TERM`, `HUP`, …) with kill(1).
    fn signal(&self, name: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args([&format!("-{name}"), &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Kills the process at once and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// Waits up to `timeout` for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the log is written.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(unix)]
fn own_process_group(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    cmd.process_group(0);
}

#[cfg(not(unix))]
fn own_process_group(_cmd: &mut Command) {}

/// A free TCP port on 127.0.0.1 (bound then released: another process could take it
/// before it is used, which is acceptable on a test machine).
pub fn free_tcp() -> Result<SocketAddr, ProcError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| ProcError::NoPort("tcp", e))
}

/// A free UDP port on 127.0.0.1 (same caveat as [`free_tcp`]).
pub fn free_udp() -> Result<SocketAddr, ProcError> {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(|e| ProcError::NoPort("udp", e))
}

/// Polls `http://admin/readyz` until it answers 200; false after `timeout`.
pub fn wait_ready(admin: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if http_get_status(admin, "/readyz") == Some(200) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A tiny blocking HTTP/1.0 GET for admin endpoints; returns the status code.
pub fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let text = http_get(addr, path)?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// A tiny blocking HTTP/1.0 GET returning the whole response text.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    exchange(addr, &format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n"))
}

/// A tiny blocking HTTP/1.0 POST of a JSON body (admin actions); returns the whole
/// response text.
pub fn http_post_json(addr: SocketAddr, path: &str, body: &str) -> Option<String> {
    exchange(
        addr,
        &format!(
            "POST {path} HTTP/1.0\r\nHost: admin\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// Sends one HTTP/1.0 request and reads the response to its end.
fn exchange(addr: SocketAddr, request: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The JSON body of an HTTP response text, if it is JSON.
pub fn json_body(response: &str) -> Option<serde_json::Value> {
    serde_json::from_str(response.split("\r\n\r\n").nth(1)?).ok()
}

/// A node's `/status` document.
pub fn status(admin: SocketAddr) -> Option<serde_json::Value> {
    json_body(&http_get(admin, "/status")?)
}

/// The three binaries the real-process simulator starts.
pub const BINARIES: [&str; 3] = ["mesh-node", "origin-connector", "demo-origin"];

/// Directory holding `mesh-node`, `origin-connector` and `demo-origin`, up to date.
///
/// When this source tree is still where the running executable was built from, it runs
/// `cargo build` for the three (release when `dir` is a `release` directory, into the same
/// target directory), which takes a moment when they are fresh and a few minutes the first
/// time; so `cargo run --bin simulate` never runs stale or missing binaries. Without the
/// source tree (an installed `simulate`), the binaries must already be in `dir`. `dir` is
/// normally the running executable's directory (`target/<profile>`).
pub fn ensure_binaries(dir: &Path) -> Result<PathBuf, ProcError> {
    let missing = |detail: String| ProcError::MissingBinary {
        name: BINARIES.join(", "),
        dir: dir.display().to_string(),
        detail,
    };
    let all_there = || BINARIES.iter().all(|b| dir.join(b).is_file());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    if !manifest.is_file() {
        return if all_there() {
            Ok(dir.to_owned())
        } else {
            Err(missing(format!(
                "no source tree at {} to build them from",
                manifest.display()
            )))
        };
    }
    eprintln!(
        "building {} with cargo (quick when up to date)…",
        BINARIES.join(", ")
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--manifest-path"])
        .arg(&manifest);
    for b in BINARIES {
        cmd.args(["--bin", b]);
    }
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    // `cargo run` and `cargo test` give their child the package's CARGO_* variables
    // (CARGO_PKG_NAME, CARGO_BIN_NAME, CARGO_MANIFEST_DIR…). Passed on, they change what
    // some crates see at build time and make cargo rebuild them on every alternation with
    // a plain build. Only the user's own cargo settings are kept.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let user_setting = key == "CARGO_HOME"
            || key.starts_with("CARGO_BUILD_")
            || key.starts_with("CARGO_PROFILE_")
            || key.starts_with("CARGO_REGISTRIES_")
            || key.starts_with("CARGO_NET_")
            || key.starts_with("CARGO_TERM_");
        if (key.starts_with("CARGO_") && !user_setting) || key == "OUT_DIR" {
            cmd.env_remove(&key);
        }
    }
    // Build into the same target directory as the running executable.
    if let Some(target) = dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let status = cmd.status().map_err(|e| missing(e.to_string()))?;
    if !status.success() {
        return Err(missing(format!("cargo exited with {status}")));
    }
    if all_there() {
        Ok(dir.to_owned())
    } else {
        Err(missing("built, but not found there".into()))
    }
}
