//! Config files: the examples in `deploy/` load, and bad configs fail with exit code 64
//! and a message naming the key.

use std::path::Path;
use std::process::Command;

use skylane_shared::identity::NodeKey;
use skylane_tests::{TempDir, bin};

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let path = entry.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "toml") {
            std::fs::copy(&path, to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// Gives a copy of a deploy folder the keys and certificates its configs name.
fn provision(dir: &Path) -> anyhow::Result<()> {
    for name in ["fra-connector", "edge-a", "edge-b", "edge-c"] {
        NodeKey::generate()?.save(&dir.join(format!("keys/{name}.key")))?;
    }
    std::fs::write(
        dir.join("keys/challenge.secret"),
        "0123456789abcdef0123456789abcdef",
    )?;
    let ok = Command::new(bin("mesh-node"))
        .args(["dev-cert", "--out-dir"])
        .arg(dir.join("certs"))
        .output()?
        .status
        .success();
    anyhow::ensure!(ok, "dev-cert failed");
    Ok(())
}

#[test]
fn deploy_local_configs_load() -> anyhow::Result<()> {
    let tmp = TempDir::new("deploy-local");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local");
    copy_dir(&src, tmp.path())?;
    provision(tmp.path())?;
    let checks = [
        ("origin-connector", "connector.toml"),
        ("mesh-node", "edge-a.toml"),
        ("mesh-node", "edge-b.toml"),
        ("mesh-node", "edge-c.toml"),
    ];
    for (binary, file) in checks {
        let out = Command::new(bin(binary))
            .arg("--check")
            .arg("--config")
            .arg(tmp.path().join(file))
            .output()?;
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn bad_configs_exit_64_and_name_the_key() -> anyhow::Result<()> {
    let tmp = TempDir::new("bad-config");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local");
    copy_dir(&src, tmp.path())?;
    provision(tmp.path())?;
    let edge = std::fs::read_to_string(tmp.path().join("edge-a.toml"))?;
    let connector = std::fs::read_to_string(tmp.path().join("connector.toml"))?;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "mesh-node",
            edge.replace("[https]", "[https]\nlisten_port = 1"),
            "listen_port",
        ),
        (
            "mesh-node",
            edge.replace("shutdown_grace_ms = 5000", "shutdown_grace_ms = \"soon\""),
            "shutdown_grace_ms",
        ),
        (
            "mesh-node",
            edge.replace("path_prefix = \"/\"", "path_prefix = \"api\""),
            "routes[0].path_prefix",
        ),
        (
            "mesh-node",
            edge.replace("keys/edge-a.key\"", "keys/missing.key\""),
            "node.key_file",
        ),
        (
            "mesh-node",
            edge.replace("name = \"edge-a\"\nregion", "name = \"nobody\"\nregion"),
            "node.name",
        ),
        (
            "mesh-node",
            edge.replace("# worker_threads = 1 ", "worker_threads = 1025 "),
            "node.worker_threads",
        ),
        (
            "mesh-node",
            edge.replace("websocket_idle_ms = 75000", "websocket_idle_ms = 1000"),
            "timeouts.websocket_idle_ms",
        ),
        (
            "mesh-node",
            edge.replace("rate_limits = [\"per-ip\"]", "rate_limits = [\"nope\"]"),
            "routes[1].rate_limits[0]",
        ),
        (
            "mesh-node",
            edge.replace("proxy_protocol = false", "proxy_protocol = true"),
            "client_address.proxy_protocol",
        ),
        (
            "mesh-node",
            edge.replace(
                "trusted_proxies = []",
                "trusted_proxies = [\"10.0.0.0/40\"]",
            ),
            "client_address.trusted_proxies[0]",
        ),
        (
            "mesh-node",
            edge.replace("key = \"ip\"", "key = \"geo\""),
            "rate_limits[0].key",
        ),
        (
            "mesh-node",
            edge.replace("keys/challenge.secret", "keys/no-such.secret"),
            "under_attack.secret_file",
        ),
        (
            "mesh-node",
            edge.replace("listen = \"127.0.0.1:9101\"", "listen = \"0.0.0.0:9101\""),
            "admin.token_file",
        ),
        (
            "mesh-node",
            edge.replace("max_connections_per_ip = 256", "max_connections_per_ip = 0"),
            "limits.max_connections_per_ip",
        ),
        (
            "mesh-node",
            edge.replace(
                "max_object_bytes = 67108864",
                "max_object_bytes = 536870912",
            ),
            "cache.max_object_bytes",
        ),
        (
            "mesh-node",
            edge.replace("path_prefix = \"/static/\"", "path_prefix = \"static\""),
            "cache.rules[2].path_prefix",
        ),
        (
            "mesh-node",
            edge.replace("mode = \"bypass\" ", "mode = \"sometimes\" "),
            "mode",
        ),
        (
            "mesh-node",
            edge.replace("mode = \"bypass\" ", "edge_ttl_s = 60\nmode = \"bypass\" "),
            "cache.rules[0].mode",
        ),
        (
            // A connector that dials out (no address of its own) must know every edge's.
            "origin-connector",
            connector
                .replace("address = \"127.0.0.1:7000\"\n", "")
                .replace("address = \"127.0.0.1:7003\"\n", ""),
            "mesh.members",
        ),
        (
            "origin-connector",
            format!(
                "{connector}\n[wireguard]\nlisten = \"0.0.0.0:7100\"\nallowed_sources = [\"10.77.0.2\"]\n"
            ),
            "wireguard.listen",
        ),
        (
            "origin-connector",
            format!(
                "{connector}\n[wireguard]\nlisten = \"10.77.0.1:7100\"\nallowed_sources = [\"10.77.0.0/33\"]\n"
            ),
            "wireguard.allowed_sources[0]",
        ),
        (
            "origin-connector",
            format!(
                "{connector}\n[wireguard]\nlisten = \"10.77.0.1:7100\"\nallowed_sources = []\n"
            ),
            "wireguard.allowed_sources",
        ),
        (
            "mesh-node",
            edge.replace(
                "name = \"edge-a\"\nrole = \"edge\"",
                "name = \"edge-a\"\nrole = \"edge\"\ntransport = \"wireguard\"",
            ),
            "mesh.members[1].transport",
        ),
        (
            "mesh-node",
            format!(
                "{edge}\n[[wireguard.peers]]\nname = \"vpn\"\npublic_key = \"short\"\nendpoint = \"vpn.example.net:51820\"\naddress = \"10.77.0.2\"\nallowed_ips = [\"10.77.0.0/24\"]\n"
            ),
            "wireguard.peers[0].public_key",
        ),
        (
            "origin-connector",
            connector.replace("queue_timeout_ms = 1000", "queue_timeout_ms = -1"),
            "queue_timeout_ms",
        ),
        (
            "origin-connector",
            connector.replace("interval_ms = 1000", "interval_ms = 0"),
            "services.web.health_check.interval_ms",
        ),
        (
            "origin-connector",
            connector.replace("servers = [\"127.0.0.1:8080\"]", "servers = [\"no-port\"]"),
            "services.web.servers[0]",
        ),
        (
            "origin-connector",
            connector.replace("[services.web]", "[services.web]\nretries = 3"),
            "retries",
        ),
    ];
    for (binary, text, key) in cases {
        let path = tmp.path().join("case.toml");
        std::fs::write(&path, &text)?;
        let out = Command::new(bin(binary))
            .arg("--check")
            .arg("--config")
            .arg(&path)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{key}: {err}");
        assert!(err.contains(key), "the error should name `{key}`: {err}");
        assert!(
            err.contains("case.toml"),
            "the error should name the file: {err}"
        );
    }
    Ok(())
}

#[test]
fn keygen_writes_a_private_key_and_its_public_key() -> anyhow::Result<()> {
    let tmp = TempDir::new("keygen");
    let key = tmp.path().join("n/node.key");
    let out = Command::new(bin("mesh-node"))
        .args(["keygen", "--out"])
        .arg(&key)
        .output()?;
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout)?.trim().to_owned();
    let public = std::fs::read_to_string(tmp.path().join("n/node.key.pub"))?;
    assert_eq!(public.trim(), printed);
    assert_eq!(NodeKey::load(&key)?.id().to_string(), printed);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&key)?.permissions().mode() & 0o777, 0o600);
    }
    // Refuses to overwrite.
    let again = Command::new(bin("mesh-node"))
        .args(["keygen", "--out"])
        .arg(&key)
        .output()?;
    assert!(!again.status.success());
    Ok(())
}
