// Skylane demo chat: echoes messages through /ws and shows each round trip time.
(function () {
  "use strict";
  const log = document.getElementById("log");
  const form = document.getElementById("send");
  const input = document.getElementById("text");
  const status = document.getElementById("status");
  const stats = document.getElementById("stats");
  const rtts = [];
  // Sent messages wait here, keyed by a sequence number, until their echo arrives.
  const pending = new Map();
  let seq = 0;
  let ws = null;
  let retryMs = 500;

  fetch("/api/time", { cache: "no-store" })
    .then((r) => r.json())
    .then((t) => { document.getElementById("origin").textContent = t.origin; })
    .catch(() => {});

  function setStatus(text, cls) {
    status.textContent = text;
    status.className = "status " + cls;
  }

  function add(kind, text, rtt) {
    const li = document.createElement("li");
    li.className = kind;
    const body = document.createElement("span");
    body.textContent = text;
    li.appendChild(body);
    if (rtt !== undefined) {
      const badge = document.createElement("span");
      badge.className = "rtt";
      badge.textContent = rtt.toFixed(1) + " ms";
      li.appendChild(badge);
    }
    log.appendChild(li);
    li.scrollIntoView({ block: "end" });
  }

  function showStats() {
    if (rtts.length === 0) return;
    const sorted = rtts.slice().sort((a, b) => a - b);
    const median = sorted[Math.floor(sorted.length / 2)];
    stats.textContent = rtts.length + " round trips, median " + median.toFixed(1) +
      " ms, min " + sorted[0].toFixed(1) + " ms, max " + sorted[sorted.length - 1].toFixed(1) + " ms";
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(scheme + "//" + location.host + "/ws");
    setStatus("connecting", "connecting");
    ws.onopen = () => { retryMs = 500; setStatus("connected", "open"); };
    ws.onmessage = (ev) => {
      const now = performance.now();
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { msg = null; }
      if (msg && pending.has(msg.seq)) {
        const rtt = now - pending.get(msg.seq);
        pending.delete(msg.seq);
        rtts.push(rtt);
        add("echo", msg.text, rtt);
        showStats();
      } else {
        add("echo", String(ev.data));
      }
    };
    ws.onclose = (ev) => {
      setStatus("closed (" + ev.code + ")", "closed");
      add("system", "connection closed: code " + ev.code + (ev.reason ? ", " + ev.reason : ""));
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 10000);
    };
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || !ws || ws.readyState !== WebSocket.OPEN) return;
    seq += 1;
    if (text.startsWith("close:")) {
      // Sent as-is so the server's close command works from the page too.
      ws.send(text);
    } else {
      pending.set(seq, performance.now());
      ws.send(JSON.stringify({ seq: seq, text: text }));
    }
    add("mine", text);
    input.value = "";
  });

  connect();
})();
