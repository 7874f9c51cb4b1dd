// mesh-node status page: plain DOM + EventSource, no build step. API: proto/CONSOLE.md.
//
// State: the last status document, with its peers kept in a Map by id. The event stream
// (api/events) starts with a `status` event (whole document), then sends `peer` upserts,
// `removed` ({id}) and `status` resyncs. Peer events update the nodes table at once; the
// other sections (models, hosting, experts, shards, keys added later) are derived by the node,
// so after peer changes the page re-reads api/status (debounced) for everything but peers.
//
// Test hooks: every node row is `tr[data-node-id][data-status]`, <body data-connection>
// is connecting | live | reconnecting | offline.
"use strict";

(() => {
  const GONE = new Set(["dead", "left"]);
  const STATUSES = ["alive", "suspect", "dead", "left"];
  const HEADER_KEYS = new Set(["node", "mesh"]);
  const REFRESH_DELAY_MS = 300;
  const FETCH_TIMEOUT_MS = 5000;
  const RETRY_MIN_MS = 1000;
  const RETRY_MAX_MS = 15000;

  // One entry per known top-level key of the status document, in display order. Keys
  // without an entry get renderGeneric. To add a panel (e.g. placements), add a line.
  const SECTIONS = [
    { key: "peers", title: "Nodes", render: renderPeers },
    { key: "models", title: "Models", render: renderModels },
    { key: "hosting", title: "Hosting", render: renderHosting },
    { key: "experts", title: "Experts", render: renderExperts },
    { key: "shards", title: "Shards", render: renderShards },
  ];

  const state = {
    doc: null, // the status document without "peers"
    peers: new Map(), // id -> PEER
    connection: "connecting",
    updated: null, // Date of the last event
  };
  window.meshConsole = state; // for the curious, in the browser's devtools

  // ---------------------------------------------------------------- DOM helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const muted = (text) => el("span", { class: "muted" }, text);

  function bytes(n) {
    if (typeof n !== "number" || !isFinite(n)) return "?";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
  }

  function count(n) {
    if (typeof n !== "number" || !isFinite(n)) return "?";
    for (const [size, unit] of [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "K"]]) {
      if (n >= size) return `${(n / size).toFixed(1)}${unit}`;
    }
    return String(n);
  }

  function duration(seconds) {
    seconds = Math.max(0, seconds);
    if (seconds < 60) return `${Math.floor(seconds)}s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)}m`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)}h`;
    return `${Math.floor(seconds / 86400)}d`;
  }

  // <time data-ts data-rel> elements are re-labelled every second by tick().
  function relativeTime(ts, rel) {
    const node = el("time", {
      "data-ts": ts, "data-rel": rel, datetime: new Date(ts * 1000).toISOString(),
      title: new Date(ts * 1000).toLocaleString(),
    });
    labelTime(node, Date.now() / 1000);
    return node;
  }

  function labelTime(node, now) {
    const age = duration(now - Number(node.dataset.ts));
    node.textContent = node.dataset.rel === "for" ? `for ${age}` : `${age} ago`;
  }

  function tick() {
    const now = Date.now() / 1000;
    for (const node of document.querySelectorAll("time[data-ts]")) labelTime(node, now);
  }

  function peerLabel(id) {
    const peer = state.peers.get(id);
    const label = (peer && (peer.name || peer.short)) || String(id).slice(0, 10);
    return el("span", {
      class: "chip", title: id, "data-ref-node": id, "data-status": peer ? peer.status : null,
    }, label);
  }

  function compact(value) {
    if (value === null || value === undefined) return muted("–");
    if (typeof value !== "object") return String(value);
    const text = JSON.stringify(value);
    return el("code", { title: text.length > 200 ? text : null },
      text.length > 200 ? `${text.slice(0, 200)}…` : text);
  }

  // ---------------------------------------------------------------- nodes

  function comparePeers(a, b) {
    return (b.self === true) - (a.self === true)
      || GONE.has(a.status) - GONE.has(b.status)
      || String(a.name || "").localeCompare(String(b.name || ""))
      || String(a.id).localeCompare(String(b.id));
  }

  function hardwareCell(hw, machine) {
    if (!hw) return muted("not known yet");
    const lines = [el("div", {}, `${hw.cpu_cores ?? "?"} cores · RAM ${bytes(hw.ram_free)} free of ${bytes(hw.ram_total)}`)];
    for (const gpu of hw.gpus || []) {
      lines.push(el("div", {}, `${gpu.name}: ${bytes(gpu.vram_free)} free of ${bytes(gpu.vram_total)}`));
    }
    if (!(hw.gpus || []).length) lines.push(el("div", { class: "muted" }, "no GPU"));
    if (machine) {
      lines.push(el("div", { class: "muted", title: "nodes on one machine share its memory" },
        `machine ${String(machine).slice(0, 8)}`));
    }
    return el("div", { class: "lines" }, lines);
  }

  function modelsCell(peer) {
    const served = new Set(peer.models_served || []);
    const lines = [];
    for (const name of served) lines.push(el("div", { class: "serving" }, `serving ${name}`));
    for (const m of peer.models_on_disk || []) {
      if (served.has(m.name)) continue;
      lines.push(el("div", { title: `${m.architecture} · ${count(m.parameters)} parameters` },
        `${m.name} `, muted(`(${bytes(m.bytes)} on disk)`)));
    }
    for (const shard of peer.expert_shards || []) {
      lines.push(el("div", { class: "muted" },
        `${shard.model} layer ${shard.layer}: ${(shard.experts || []).length} experts`));
    }
    return lines.length ? el("div", { class: "lines" }, lines) : muted("none");
  }

  function peerRow(peer) {
    const gone = GONE.has(peer.status);
    const load = peer.load || {};
    return el("tr", {
      "data-node-id": peer.id, "data-status": peer.status, "data-self": peer.self ? "true" : null,
      class: gone ? "gone" : null,
    },
      el("td", {},
        el("code", { class: "id", title: peer.id }, peer.short || String(peer.id).slice(0, 10)),
        " ", el("span", { class: "name" }, peer.name || ""),
        peer.self ? el("span", { class: "badge" }, "this node") : null),
      el("td", { class: "status-cell" },
        el("span", { class: `status status-${peer.status}` }, peer.status),
        typeof peer.status_since === "number"
          ? el("div", { class: "muted" }, relativeTime(peer.status_since, "for")) : null),
      el("td", {}, peer.role || muted("?")),
      el("td", { class: "lines" }, (peer.addresses || []).map((a) => el("div", {}, el("code", {}, a)))),
      el("td", {}, hardwareCell(peer.hardware, peer.machine)),
      el("td", {}, modelsCell(peer)),
      el("td", {}, `${load.inflight ?? 0} in flight`, el("div", { class: "muted" },
        `${(load.tokens_per_s ?? 0).toFixed(1)} tok/s`)),
      el("td", {}, peer.self ? muted("this node")
        : typeof peer.last_seen === "number" ? relativeTime(peer.last_seen, "ago") : muted("never")),
      el("td", {}, typeof peer.rtt_ms === "number" ? `${peer.rtt_ms.toFixed(1)} ms` : muted("–")),
    );
  }

  const PEER_COLUMNS = ["Node", "Status", "Role", "Addresses", "Hardware", "Models", "Load", "Last seen", "RTT"];

  function renderPeers(body) {
    let tbody = body.querySelector("tbody");
    if (!tbody) {
      tbody = el("tbody", { id: "nodes" });
      body.replaceChildren(el("table", {},
        el("thead", {}, el("tr", {}, PEER_COLUMNS.map((c) => el("th", {}, c)))), tbody));
    }
    // Keyed update: unchanged rows stay, changed rows are replaced, order is re-applied.
    const rows = new Map([...tbody.children].map((row) => [row.dataset.nodeId, row]));
    for (const peer of [...state.peers.values()].sort(comparePeers)) {
      const signature = JSON.stringify(peer);
      let row = rows.get(peer.id);
      if (!row || row.signature !== signature) {
        const fresh = peerRow(peer);
        fresh.signature = signature;
        if (row) row.replaceWith(fresh);
        row = fresh;
      }
      rows.delete(peer.id);
      tbody.append(row);
    }
    for (const row of rows.values()) row.remove();
  }

  // ---------------------------------------------------------------- models

  function renderModels(body, models) {
    if (!Array.isArray(models) || !models.length) {
      body.replaceChildren(el("p", { class: "empty" }, "No models on any node yet."));
      return;
    }
    const size = (name) => {
      for (const peer of state.peers.values()) {
        const m = (peer.models_on_disk || []).find((x) => x.name === name);
        if (m) return `${count(m.parameters)} parameters · ${bytes(m.bytes)}`;
      }
      return "";
    };
    body.replaceChildren(el("table", {},
      el("thead", {}, el("tr", {}, ["Model", "Size", "Served by", "On disk at"].map((c) => el("th", {}, c)))),
      el("tbody", {}, models.map((m) => el("tr", { "data-model": m.name },
        el("td", {}, el("code", {}, m.name)),
        el("td", { class: "muted" }, size(m.name)),
        el("td", {}, (m.served_by || []).length ? m.served_by.map(peerLabel) : muted("nobody")),
        el("td", {}, (m.on_disk || []).map(peerLabel)))))));
  }

  function renderHosting(body, hosting) {
    if (!Array.isArray(hosting) || !hosting.length) {
      body.replaceChildren(el("p", { class: "empty" }, "No model to host yet."));
      return;
    }
    const list = (ids, none) => ((ids || []).length ? ids.map(peerLabel) : muted(none));
    body.replaceChildren(el("table", {},
      el("thead", {}, el("tr", {}, ["Model", "Elected hosts", "Ready", "Eligible", "Plan"].map((c) => el("th", {}, c)))),
      el("tbody", {}, hosting.map((h) => el("tr", { "data-hosting": h.model },
        el("td", {}, el("code", {}, h.model)),
        el("td", {}, list(h.hosts, "nobody fits")),
        el("td", {}, list(h.ready, "loading")),
        el("td", { class: "muted" }, `${(h.eligible || []).length} node(s)`),
        el("td", { class: "muted" }, el("code", {}, h.fingerprint || "")))))));
  }

  // ---------------------------------------------------------------- experts

  // Expert parallelism: one block per split MoE model (ExpertParallel.status() on the node,
  // proto/CONSOLE.md "experts"). Node ids come from the plan; names from the peer table;
  // everything is put in the DOM as text, never as HTML.
  const GRID_MAX_CELLS = 64 * 48; // a full layers x experts grid up to this size, else per layer
  const NODE_COLOURS = 8; // .holder-0 ... .holder-7 in console.css, reused round-robin

  const percent = (x) => (typeof x === "number" && isFinite(x) ? `${(x * 100).toFixed(1)}%` : "?");
  const digest = (value, none) => (value ? el("code", {}, String(value)) : muted(none));

  function holderColour(index) {
    return `var(--holder-${index % NODE_COLOURS})`;
  }

  // A swatch with the node's colour, for the legend, the node table and the grid cells.
  function swatch(index) {
    return el("span", { class: "swatch", style: `background:${holderColour(index)}` });
  }

  function agreementCell(plan) {
    const following = plan.following || {};
    const ids = Object.keys(following);
    if (plan.agreed) {
      return el("span", { class: "agreed", "data-agreed": "true" }, `all ${ids.length} node(s) follow it`);
    }
    const behind = ids.filter((id) => following[id] !== plan.fingerprint);
    return el("span", { class: "disagreed", "data-agreed": "false" },
      `${ids.length - behind.length} of ${ids.length} node(s) follow it; not yet: `,
      behind.map(peerLabel));
  }

  function expertNodesTable(plan, colourOf) {
    const held = plan.held || {};
    const following = plan.following || {};
    const rows = (plan.nodes || []).map((n) => {
      const have = held[n.node_id];
      const complete = have === n.bytes;
      const follows = following[n.node_id];
      return el("tr", { "data-expert-node": n.node_id },
        el("td", {}, swatch(colourOf.get(n.node_id)),
          el("code", { class: "id", title: n.node_id }, n.short || String(n.node_id).slice(0, 10)),
          " ", peerLabel(n.node_id), n.host ? el("span", { class: "badge" }, "host") : null),
        el("td", { class: "num" }, String(n.count ?? "?")),
        el("td", { class: complete ? "num" : "num behind" },
          typeof have === "number" ? bytes(have) : bytes(0), muted(` / ${bytes(n.bytes)}`)),
        el("td", { class: "num" }, bytes(n.budget)),
        el("td", { class: "num" }, percent(n.budget_share), muted(" vs "), percent(n.bytes_share)),
        el("td", {}, follows === plan.fingerprint ? muted("this plan")
          : follows ? el("code", { class: "behind" }, follows) : muted("none yet")));
    });
    // Nodes that hold or follow something but have no part in this plan (e.g. a stale plan).
    const planned = new Set((plan.nodes || []).map((n) => n.node_id));
    for (const id of new Set([...Object.keys(held), ...Object.keys(following)])) {
      if (planned.has(id)) continue;
      rows.push(el("tr", { "data-expert-node": id, class: "extra" },
        el("td", {}, el("code", { class: "id", title: id }, String(id).slice(0, 10)), " ",
          peerLabel(id), el("span", { class: "badge" }, "not in plan")),
        el("td", { class: "num" }, muted("0")),
        el("td", { class: "num behind" }, bytes(held[id] || 0), muted(" / 0 B")),
        el("td", {}, muted("–")), el("td", {}, muted("–")),
        el("td", {}, following[id] ? el("code", {}, following[id]) : muted("none yet"))));
    }
    return el("table", { class: "expert-nodes" },
      el("thead", {}, el("tr", {}, el("th", {}, "Node"),
        ["Experts", "Held / planned", "Budget", "Budget share vs bytes share"]
          .map((c) => el("th", { class: "num" }, c)),
        el("th", {}, "Follows"))),
      el("tbody", {}, rows));
  }

  // (layer, expert) -> [node ids], from the plan's per-node assignments (host first).
  function holdersIndex(plan) {
    const index = new Map();
    for (const n of plan.nodes || []) {
      for (const [layer, experts] of Object.entries(n.experts || {})) {
        for (const expert of experts) {
          const key = `${layer}/${expert}`;
          if (!index.has(key)) index.set(key, []);
          index.get(key).push(n.node_id);
        }
      }
    }
    return index;
  }

  function cellBackground(holders, colourOf) {
    if (holders.length === 1) return `background:${holderColour(colourOf.get(holders[0]))}`;
    const step = 100 / holders.length;
    const stops = holders.map((id, i) =>
      `${holderColour(colourOf.get(id))} ${(i * step).toFixed(2)}% ${((i + 1) * step).toFixed(2)}%`);
    return `background:linear-gradient(to bottom, ${stops.join(", ")})`;
  }

  function peerName(id) {
    const peer = state.peers.get(id);
    const short = String(id).slice(0, 10);
    return peer && peer.name ? `${peer.name} (${short})` : short;
  }

  // Layers x experts: each cell coloured by its holders (stripes when replicated); the
  // title names them. Too big a grid collapses to one row per layer with counts per node.
  function expertGrid(plan, colourOf) {
    const layers = plan.layers || [];
    const width = plan.num_experts || 0;
    if (!layers.length || !width) return null;
    const index = holdersIndex(plan);
    const hot = new Set((plan.unreplicated || []).map(([l, e]) => `${l}/${e}`));
    if (layers.length * width > GRID_MAX_CELLS) {
      const nodes = plan.nodes || [];
      return el("table", { class: "expert-layers", "data-grid": "per-layer" },
        el("thead", {}, el("tr", {}, el("th", {}, "Layer"),
          nodes.map((n) => el("th", { class: "num" }, swatch(colourOf.get(n.node_id)), peerName(n.node_id))),
          el("th", { class: "num" }, "replicated"), el("th", { class: "num" }, "missing"))),
        el("tbody", {}, layers.map((layer) => {
          let replicated = 0;
          let missing = 0;
          for (let e = 0; e < width; e++) {
            const holders = index.get(`${layer}/${e}`) || [];
            if (holders.length > 1) replicated++;
            if (!holders.length) missing++;
          }
          return el("tr", { "data-layer": layer },
            el("th", {}, String(layer)),
            nodes.map((n) => el("td", { class: "num" }, String(((n.experts || {})[String(layer)] || []).length))),
            el("td", { class: "num" }, String(replicated)),
            el("td", { class: missing ? "num behind" : "num" }, String(missing)));
        })));
    }
    const experts = [...Array(width).keys()];
    return el("table", { class: "expert-grid", "data-grid": "cells" },
      el("thead", {}, el("tr", {}, el("th", {}, "layer \\ expert"),
        experts.map((e) => el("th", { class: "num" }, String(e))))),
      el("tbody", {}, layers.map((layer) => el("tr", { "data-layer": layer },
        el("th", {}, String(layer)),
        experts.map((e) => {
          const holders = index.get(`${layer}/${e}`) || [];
          const classes = ["cell"];
          if (!holders.length) classes.push("missing");
          if (hot.has(`${layer}/${e}`)) classes.push("unreplicated");
          const what = holders.length ? holders.map(peerName).join(", ") : "nobody";
          return el("td", {
            class: classes.join(" "),
            "data-expert": e,
            "data-holders": holders.join(" "),
            style: holders.length ? cellBackground(holders, colourOf) : null,
            title: `layer ${layer}, expert ${e}: ${what}`
              + (hot.has(`${layer}/${e}`) ? " (hot, short of replicas)" : ""),
          });
        })))));
  }

  function expertModel(plan) {
    const parts = [el("h3", {}, el("code", {}, plan.model))];
    if (plan.error) parts.push(el("p", { class: "error", "data-error": "" }, plan.error));
    if (!plan.fingerprint) {
      parts.push(el("p", { class: "empty" }, "No expert plan yet."));
    } else {
      const colourOf = new Map((plan.nodes || []).map((n, i) => [n.node_id, i]));
      const dispatch = plan.dispatch;
      const facts = [
        ["Plan", el("span", {}, el("code", { "data-fingerprint": "" }, plan.fingerprint), " ", agreementCell(plan))],
        ["Host", plan.host ? peerLabel(plan.host) : muted("none")],
        ["Rankings", plan.rankings === "uniform" ? muted("uniform (no rankings yet)") : digest(plan.rankings, "none")],
        ["Demand", digest(plan.demand_digest, "none")],
        ["Shape", `${(plan.layers || []).length} layers × ${plan.num_experts ?? "?"} experts · `
          + `${bytes(plan.expert_bytes)} each · ${bytes(plan.total_bytes)} placed`],
        ["Replicas", el("span", {},
          el("span", { "data-replicas": (plan.replicas || []).length },
            `${(plan.replicas || []).length} expert(s) held twice or more`),
          " · ",
          el("span", { "data-unreplicated": (plan.unreplicated || []).length,
            class: (plan.unreplicated || []).length ? "behind" : null },
          `${(plan.unreplicated || []).length} hot expert(s) short of replicas`))],
      ];
      if (dispatch && typeof dispatch === "object") {
        facts.push(["Dispatch", el("span", { "data-dispatch": "" },
          `${dispatch.steps ?? 0} steps · ${dispatch.remote_calls ?? 0} remote calls · `,
          el("span", { class: dispatch.failovers ? "behind" : null }, `${dispatch.failovers ?? 0} failovers`))]);
      }
      parts.push(el("table", { class: "facts" },
        el("tbody", {}, facts.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))))));
      parts.push(expertNodesTable(plan, colourOf));
      const grid = expertGrid(plan, colourOf);
      if (grid) {
        parts.push(el("details", { class: "grid", open: "" },
          el("summary", {}, grid.dataset.grid === "cells"
            ? "Who holds each expert (stripes: replicas; outlined: hot, short of replicas)"
            : "Experts per node, layer by layer (too many experts for a cell per expert)"),
          el("div", { class: "scroll" }, grid)));
      }
    }
    return el("div", { class: "expert-model", "data-experts-model": plan.model }, parts);
  }

  function renderExperts(body, experts) {
    if (!Array.isArray(experts) || !experts.length) {
      body.replaceChildren(el("p", { class: "empty" }, "No split MoE models."));
      return;
    }
    // Keep the open/closed state of each grid across refreshes.
    const closed = new Set([...body.querySelectorAll("[data-experts-model] > details:not([open])")]
      .map((d) => d.parentElement.dataset.expertsModel));
    body.replaceChildren(...experts.map((plan) => {
      const block = expertModel(plan);
      if (closed.has(plan.model)) block.querySelector("details")?.removeAttribute("open");
      return block;
    }));
  }

  // ---------------------------------------------------------------- shards

  // Independent-shard mode (`--moe-shards`): one block per model this node serves as a shard
  // (IndependentShards.status() on the node, proto/CONSOLE.md "shards"). Node i of `nodes`
  // serves shard i; the experts themselves are known for this node's shard only. Every field
  // but `model` may be missing (a node from before it was added shows less, not nothing).
  const DIGEST_CHARS = 16;

  const shortDigest = (value) => {
    const text = String(value);
    return el("code", { title: text.length > DIGEST_CHARS ? text : null },
      text.length > DIGEST_CHARS ? `${text.slice(0, DIGEST_CHARS)}…` : text);
  };

  const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);

  // Experts per layer of `model` as a peer announced it (for nodes that do not send num_experts).
  function modelExperts(model) {
    for (const peer of state.peers.values()) {
      const m = (peer.models_on_disk || []).find((x) => x && x.name === model);
      if (m && typeof m.experts === "number" && m.experts > 0) return m.experts;
    }
    return null;
  }

  function shardModel(entry) {
    const self = state.doc && state.doc.node;
    const nodes = Array.isArray(entry.nodes) ? entry.nodes.map(String) : [];
    const count = typeof entry.shards === "number" ? entry.shards : nodes.length;
    const mine = typeof entry.shard === "number" ? entry.shard : null;
    const total = typeof entry.num_experts === "number" ? entry.num_experts : modelExperts(entry.model);
    const held = isObject(entry.experts) ? entry.experts : {};
    const layers = Object.keys(held).filter((l) => Array.isArray(held[l]))
      .sort((a, b) => Number(a) - Number(b));
    const core = isObject(entry.core) ? entry.core : null;
    const coreSizes = core ? Object.values(core).filter(Array.isArray).map((ids) => ids.length) : [];
    const coreSize = coreSizes.length ? Math.min(...coreSizes) : null;
    const perShard = Array.isArray(entry.experts_per_shard) ? entry.experts_per_shard : [];
    // The shard nodes now against the split this node has loaded: they differ while it reloads.
    const changed = nodes.length !== count || (mine !== null && self && nodes[mine] !== self);

    const expertsLabel = (n) => {
      if (typeof n !== "number") return muted("–");
      const parts = [`${n}`];
      if (total) parts.push(muted(` of ${total}`));
      if (coreSize !== null) parts.push(muted(` (${coreSize} core + ${n - coreSize} own)`));
      return el("span", {}, parts);
    };
    const heldCount = layers.length ? Math.min(...layers.map((l) => held[l].length)) : null;

    const quality = typeof entry.quality === "string" ? entry.quality : "";
    let qualityCell;
    if (!quality) qualityCell = muted("not reported");
    else if (quality === "measuring") qualityCell = muted("measuring… (each shard against the whole model)");
    else qualityCell = el("span", { class: quality.startsWith("quality not measured") ? "behind" : null }, quality);

    const facts = [
      ["Split", el("span", {},
        `${count} shard(s)`,
        mine !== null ? ` · this node serves shard ${mine + 1}` : null,
        total ? muted(` · ${total} experts per layer in the whole model`) : null)],
      ["Quality", el("span", { "data-quality": quality }, qualityCell)],
    ];
    if (coreSize !== null) {
      facts.push(["Shared core", `${coreSize} expert(s) per layer, the hottest, on every shard`]);
    }
    facts.push(["Plan", entry.plan ? el("span", { "data-plan": String(entry.plan) }, shortDigest(entry.plan)) : muted("none")]);
    facts.push(["Rankings", entry.rankings === "uniform" || !entry.rankings
      ? muted("uniform (no rankings)") : shortDigest(entry.rankings)]);

    const parts = [el("h3", {}, el("code", {}, entry.model))];
    parts.push(el("table", { class: "facts" },
      el("tbody", {}, facts.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))))));
    if (changed) {
      parts.push(el("p", { class: "behind", "data-resplit": "" },
        `The shard nodes changed (${nodes.length} now, ${count} in the split loaded here): `
        + "the shards are being split again."));
    }
    const rows = nodes.map((id, i) => el("tr", { "data-shard-node": id, "data-shard": i },
      el("td", {}, `shard ${i + 1}`),
      el("td", {},
        el("code", { class: "id", title: id }, id.slice(0, 10)), " ", peerLabel(id),
        id === self ? el("span", { class: "badge" }, "this node") : null),
      el("td", { class: "num" }, expertsLabel(
        id === self && heldCount !== null ? heldCount : changed ? null : perShard[i]))));
    parts.push(nodes.length
      ? el("table", { class: "shard-nodes" },
        el("thead", {}, el("tr", {}, el("th", {}, "Shard"), el("th", {}, "Node"),
          el("th", { class: "num" }, "Experts per layer"))),
        el("tbody", {}, rows))
      : el("p", { class: "empty" }, "No shard nodes known."));
    if (layers.length) {
      const coreOf = (layer) => new Set(core && Array.isArray(core[layer]) ? core[layer] : []);
      parts.push(el("details", { class: "grid", "data-held": "" },
        el("summary", {}, `Experts this node holds, layer by layer (${layers.length} MoE layers`
          + (coreSize !== null ? "; bold: the shared core)" : ")")),
        el("div", { class: "scroll" }, el("table", { class: "expert-layers" },
          el("tbody", {}, layers.map((layer) => {
            const shared = coreOf(layer);
            return el("tr", { "data-layer": layer },
              el("th", {}, `layer ${layer}`),
              el("td", { class: "num" }, String(held[layer].length)),
              el("td", { class: "expert-ids" }, held[layer].map((e) =>
                el("span", { class: shared.has(e) ? "core" : null }, String(e)))));
          }))))));
    }
    return el("div", { class: "shard-model", "data-shards-model": entry.model }, parts);
  }

  function renderShards(body, shards) {
    const entries = Array.isArray(shards) ? shards.filter(isObject) : [];
    if (!entries.length) {
      body.replaceChildren(el("p", { class: "empty" }, "No model served as independent shards."));
      return;
    }
    // Keep each model's expert list open across refreshes when the user opened it.
    const open = new Set([...body.querySelectorAll("[data-shards-model] > details[open]")]
      .map((d) => d.parentElement.dataset.shardsModel));
    body.replaceChildren(...entries.map((entry) => {
      const block = shardModel(entry);
      if (open.has(String(entry.model))) block.querySelector("details")?.setAttribute("open", "");
      return block;
    }));
  }

  // ---------------------------------------------------------------- anything else

  function renderGeneric(body, value) {
    if (Array.isArray(value) && value.length && value.every((v) => v && typeof v === "object" && !Array.isArray(v))) {
      const columns = [...new Set(value.flatMap((v) => Object.keys(v)))].slice(0, 12);
      body.replaceChildren(el("table", {},
        el("thead", {}, el("tr", {}, columns.map((c) => el("th", {}, c)))),
        el("tbody", {}, value.map((row) => el("tr", {}, columns.map((c) => el("td", {}, compact(row[c]))))))));
    } else if (value && typeof value === "object" && !Array.isArray(value)) {
      body.replaceChildren(el("table", {}, el("tbody", {}, Object.entries(value).map(([k, v]) =>
        el("tr", {}, el("th", {}, k), el("td", {}, compact(v)))))));
    } else {
      body.replaceChildren(el("p", {}, compact(value)));
    }
  }

  // ---------------------------------------------------------------- page

  function section(key, title) {
    const main = document.getElementById("sections");
    let node = main.querySelector(`:scope > section[data-section="${CSS.escape(key)}"]`);
    if (!node) {
      node = el("section", { "data-section": key }, el("h2", {}, title), el("div", { class: "body" }));
      main.append(node);
    }
    return node;
  }

  function renderHeader() {
    const self = [...state.peers.values()].find((p) => p.self);
    const id = state.doc && state.doc.node;
    document.getElementById("self-node").replaceChildren(id ? el("span", {},
      "node ", el("code", { class: "id", title: id }, String(id).slice(0, 10)),
      self && self.name ? ` (${self.name})` : "") : "");
    const peers = [...state.peers.values()];
    document.getElementById("summary").replaceChildren(
      el("span", { class: "count", "data-count": "nodes" }, `${peers.length} nodes:`),
      ...STATUSES.map((s) => el("span", { class: `count status-${s}`, "data-count": s },
        `${peers.filter((p) => p.status === s).length} ${s}`)));
  }

  function renderAll() {
    renderHeader();
    const doc = state.doc || {};
    const known = new Set(SECTIONS.map((s) => s.key));
    const order = [];
    for (const { key, title, render } of SECTIONS) {
      if (key === "peers" || key in doc) order.push([key, title, render]);
    }
    for (const key of Object.keys(doc).sort()) {
      if (!known.has(key) && !HEADER_KEYS.has(key)) order.push([key, key, renderGeneric]);
    }
    const main = document.getElementById("sections");
    const wanted = new Set(order.map(([key]) => key));
    for (const node of [...main.children]) {
      if (!wanted.has(node.dataset.section)) node.remove();
    }
    for (const [key, title, render] of order) {
      const node = section(key, title);
      main.append(node); // keeps display order
      try {
        render(node.querySelector(".body"), key === "peers" ? null : doc[key]);
      } catch (err) {
        console.error(`cannot render ${key}`, err);
        renderGeneric(node.querySelector(".body"), doc[key]);
      }
    }
  }

  // ---------------------------------------------------------------- applying events

  function applyStatus(doc) {
    if (!doc || typeof doc !== "object" || !Array.isArray(doc.peers)) return;
    const { peers, ...rest } = doc;
    state.peers = new Map(peers.filter((p) => p && p.id).map((p) => [p.id, p]));
    state.doc = rest;
    renderAll();
  }

  function applyPeer(peer) {
    if (!peer || typeof peer.id !== "string") return;
    state.peers.set(peer.id, peer);
    renderHeader();
    renderPeers(section("peers", "Nodes").querySelector(".body"));
    scheduleRefresh();
  }

  function applyRemoved(payload) {
    if (!payload || !state.peers.delete(payload.id)) return;
    renderHeader();
    renderPeers(section("peers", "Nodes").querySelector(".body"));
    scheduleRefresh();
  }

  // Re-read everything except peers (which the stream keeps current) after peer changes.
  let refreshTimer = null;
  let refreshing = false;
  let dirty = false;

  function scheduleRefresh() {
    dirty = true;
    if (!refreshTimer && !refreshing) refreshTimer = setTimeout(refresh, REFRESH_DELAY_MS);
  }

  async function refresh() {
    refreshTimer = null;
    refreshing = true;
    dirty = false;
    try {
      const response = await fetch("api/status", {
        cache: "no-store", signal: AbortSignal.timeout(FETCH_TIMEOUT_MS),
      });
      if (response.ok) {
        const { peers, ...rest } = await response.json();
        state.doc = rest;
        renderAll();
      }
    } catch (err) {
      console.warn("status refresh failed", err);
    } finally {
      refreshing = false;
      if (dirty) scheduleRefresh();
    }
  }

  // ---------------------------------------------------------------- the event stream

  let stream = null;
  let retryMs = RETRY_MIN_MS;
  let retryTimer = null;

  function setConnection(name, text) {
    state.connection = name;
    document.body.dataset.connection = name;
    document.getElementById("connection").textContent = text;
  }

  function updated() {
    state.updated = new Date();
    setConnection("live", `live · updated ${state.updated.toLocaleTimeString()}`);
  }

  function listen(name, apply) {
    stream.addEventListener(name, (event) => {
      let payload;
      try {
        payload = JSON.parse(event.data);
      } catch (err) {
        console.error(`bad ${name} event`, err);
        return;
      }
      apply(payload);
      updated();
    });
  }

  function connect() {
    retryTimer = null;
    setConnection(state.connection === "connecting" ? "connecting" : "reconnecting",
      state.connection === "connecting" ? "connecting…" : "reconnecting…");
    stream = new EventSource("api/events");
    listen("status", (doc) => { retryMs = RETRY_MIN_MS; applyStatus(doc); });
    listen("peer", applyPeer);
    listen("removed", applyRemoved);
    stream.onerror = () => {
      if (stream.readyState === EventSource.CONNECTING) {
        setConnection("reconnecting", "connection lost · reconnecting…");
        return;
      }
      // Closed for good (e.g. the node answered an error): retry ourselves, backing off.
      stream.close();
      setConnection("offline", `offline · retrying in ${Math.round(retryMs / 1000)}s`);
      retryTimer = setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
    };
  }

  connect();
  setInterval(tick, 1000);
})();
