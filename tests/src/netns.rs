//! A network namespace a test creates: joined to the host by a veth pair, with an address
//! on each end, removed when dropped. Inside it a test runs what must sit behind a network
//! boundary (a stock WireGuard endpoint, a connector behind a firewall), and nftables rules
//! in it cut or filter what crosses.
//!
//! Needs root and `ip`; [`unavailable`] says what is missing so a test can skip.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, bail};

/// Runs a command; its stdout, or an error with its stderr.
pub fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Why namespaces cannot be made here, if they cannot; `tools` are further commands the
/// test needs.
pub fn unavailable(tools: &[&str]) -> Option<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Some("not root: network namespaces need it".into());
    }
    for tool in std::iter::once(&"ip").chain(tools) {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "`{tool}` not installed (scripts/setup-test-deps.sh installs it)"
            ));
        }
    }
    None
}

/// See the module docs.
#[derive(Debug)]
pub struct Netns {
    /// A number unique to this namespace among the process's, for other names.
    pub id: u32,
    /// The namespace's name.
    pub name: String,
    /// The host's end of the veth pair.
    pub veth: String,
    /// The host's address on the pair.
    pub host_ip: String,
    /// The namespace's address on the pair.
    pub ns_ip: String,
    /// The namespace's end of the veth pair (its interface name inside).
    pub inner_veth: String,
}

impl Netns {
    /// Makes a namespace whose names start with `tag` (at most 5 characters: interface
    /// names are short), unique to this process.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        static MADE: AtomicU32 = AtomicU32::new(0);
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 10_000) * 10 + n % 10;
        let subnet = (std::process::id().wrapping_mul(7) + n) % 250;
        let ns = Self {
            id,
            name: format!("{tag}{id}"),
            veth: format!("{tag}h{id}"),
            inner_veth: format!("{tag}n{id}"),
            host_ip: format!("10.203.{subnet}.1"),
            ns_ip: format!("10.203.{subnet}.2"),
        };
        let _ = run(&["ip", "netns", "del", &ns.name]);
        let _ = run(&["ip", "link", "del", &ns.veth]);
        run(&["ip", "netns", "add", &ns.name])?;
        // From here on, dropping `ns` cleans up whatever was made.
        run(&[
            "ip",
            "link",
            "add",
            &ns.veth,
            "type",
            "veth",
            "peer",
            "name",
            &ns.inner_veth,
        ])?;
        run(&["ip", "link", "set", &ns.inner_veth, "netns", &ns.name])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", ns.host_ip),
            "dev",
            &ns.veth,
        ])?;
        run(&["ip", "link", "set", &ns.veth, "up"])?;
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", ns.ns_ip),
            "dev",
            &ns.inner_veth,
        ])?;
        ns.exec(&["ip", "link", "set", &ns.inner_veth, "up"])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["ip", "netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// The argument list that starts `program` inside (for [`crate::Proc::spawn`] with
    /// `ip` as the program).
    pub fn command(&self, program: &str) -> Vec<String> {
        vec![
            "netns".into(),
            "exec".into(),
            self.name.clone(),
            program.to_owned(),
        ]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = run(&["ip", "link", "del", &self.veth]);
    }
}
