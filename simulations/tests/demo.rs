//! The demo's short form, for CI: `simulate demo` with two edges (Sydney, Singapore), one
//! sample, 20 s in all. It must exit 0 by itself, print the comparison table, and leave no
//! process behind. Loopback only; every wait is bounded.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Processes whose command line mentions `needle` (the run's scratch directory).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle)
                .then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

#[test]
fn short_demo_prints_the_table_and_leaves_no_process() -> anyhow::Result<()> {
    let out_dir = std::env::temp_dir().join(format!("skylane-demo-test-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_simulate"))
        .args([
            "demo",
            "--duration",
            "20",
            "--edges",
            "Sydney,Singapore",
            "--samples",
            "1",
            "--warmup",
            "3",
            "--out",
        ])
        .arg(&out_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    // The first run may build mesh-node, origin-connector and demo-origin: a generous bound.
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("simulate demo did not stop by itself");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for region in ["Sydney", "Singapore"] {
        assert!(
            stdout.contains(&format!(
                "| {region} | {region} | websocket connect + first message |"
            )),
            "no websocket row for {region}:\n{stdout}\nstderr:\n{stderr}"
        );
    }
    assert!(
        stdout.contains("https://localhost:"),
        "no URL printed:\n{stdout}"
    );
    assert!(out_dir.join("report.json").is_file() && out_dir.join("report.md").is_file());
    // Children are killed before simulate exits; allow a moment for the kernel to reap.
    let needle = format!("skylane-simulate-{pid}");
    let mut left = processes_mentioning(&needle);
    for _ in 0..20 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = processes_mentioning(&needle);
    }
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&out_dir);
    Ok(())
}
