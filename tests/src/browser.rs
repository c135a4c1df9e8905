//! Headless Chromium for the browser tests (Debian's `chromium`, installed by
//! `scripts/setup-test-deps.sh`): a one-shot run (`--dump-dom`, `--screenshot`), and a
//! page held open and asked questions in real time over the DevTools protocol.
//!
//! The real-time page is for pages whose end state comes over a websocket: Chromium's
//! virtual time does not wait for a websocket handshake, so a `--virtual-time-budget`
//! can run out before the socket opens when the machine is busy.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

/// The `chromium` on PATH, if there is one.
pub fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        let out = Command::new("which").arg(name).output().ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    })
}

/// The flags this machine needs (no sandbox as root, no calls home), trusting any
/// certificate (the test edges have a dev CA), with a profile of its own.
fn command(bin: &Path, profile: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--ignore-certificate-errors",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

/// Runs Chromium once with `extra` (bounded to 60 s) and returns what it printed.
pub fn run(bin: &Path, profile: &Path, extra: &[String]) -> anyhow::Result<String> {
    let inner = command(bin, profile);
    let mut cmd = Command::new("timeout");
    cmd.arg("60")
        .arg(inner.get_program())
        .args(inner.get_args())
        .args(extra);
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A page open in a headless Chromium, driven over the DevTools protocol. The browser
/// is killed on drop.
pub struct LivePage {
    child: Child,
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl LivePage {
    /// Starts Chromium on `url` with a DevTools port of its own and attaches to the page.
    pub async fn open(bin: &Path, profile: &Path, url: &str) -> anyhow::Result<Self> {
        let mut child = command(bin, profile)
            .args(["--remote-debugging-port=0", url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting chromium")?;
        let stderr = child.stderr.take().context("chromium stderr")?;
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"; the rest of
        // stderr is drained so Chromium never blocks on a full pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("DevTools listening on ws://").nth(1)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(rest.split('/').next().unwrap_or_default().to_owned());
                }
            }
        });
        let host = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(host) => host,
            Err(_) => {
                let _ = child.kill();
                bail!("chromium never opened its DevTools port");
            }
        };
        let page = Self::page_socket(&host).await;
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                let _ = child.kill();
                return Err(e);
            }
        };
        let (socket, _) = tokio_tungstenite::connect_async(page.as_str())
            .await
            .context("attaching to the page")?;
        Ok(Self {
            child,
            socket,
            next_id: 0,
        })
    }

    /// The DevTools websocket of the first page target.
    async fn page_socket(host: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let body = reqwest::get(format!("http://{host}/json/list"))
                .await?
                .bytes()
                .await?;
            let list: serde_json::Value = serde_json::from_slice(&body)?;
            let page = list.as_array().and_then(|targets| {
                targets
                    .iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            });
            if let Some(page) = page {
                return Ok(page.to_owned());
            }
            anyhow::ensure!(Instant::now() < deadline, "chromium has no page: {list}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Evaluates `expression` in the page and returns its value (JSON).
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<serde_json::Value> {
        self.next_id += 1;
        let id = self.next_id;
        let request = serde_json::json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true},
        });
        self.socket.send(Message::text(request.to_string())).await?;
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(msg) = self.socket.next().await {
                let Message::Text(text) = msg? else { continue };
                let value: serde_json::Value = serde_json::from_str(&text)?;
                if value["id"] == id {
                    return Ok(value);
                }
            }
            bail!("chromium closed the DevTools socket")
        })
        .await
        .context("chromium did not answer")??;
        if let Some(error) = answer.get("error") {
            bail!("evaluating {expression:?}: {error}");
        }
        Ok(answer["result"]["result"]["value"].clone())
    }

    /// Evaluates `expression` every 100 ms until it is `true`, for up to `timeout`.
    /// Returns whether it became true.
    pub async fn wait_for(&mut self, expression: &str, timeout: Duration) -> anyhow::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            // A navigation in progress (the challenge's redirect) has no context to
            // evaluate in for a moment: that is not an answer, ask again.
            if let Ok(serde_json::Value::Bool(true)) = self.eval(expression).await {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The page's DOM as HTML, for failure messages.
    pub async fn dom(&mut self) -> String {
        match self.eval("document.documentElement.outerHTML").await {
            Ok(serde_json::Value::String(html)) => html,
            Ok(other) => other.to_string(),
            Err(e) => format!("(no DOM: {e:#})"),
        }
    }
}

impl Drop for LivePage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
