// nephoscope fleet dashboard: plain JS that talks only to the API with the user's token.
// Every guest-derived string is put in the page with textContent (el() below), never as markup.
"use strict";

const API = "/api/v1";
const RISKS = [["running_vulnerable", "running-vulnerable"], ["malicious_unknown", "malicious/unknown code"],
               ["unverifiable", "unverifiable"]];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));  // text, never HTML
  }
  return node;
}

function none(what) { return el("p", {class: "none"}, what ? `none recorded (${what})` : "none recorded"); }

function table(headers, rows) {
  if (!rows.length) return none();
  return el("table", {}, el("thead", {}, el("tr", {}, headers.map(h => el("th", {}, h)))),
            el("tbody", {}, rows.map(r => el("tr", {}, r.map(c => el("td", {}, c))))));
}

function section(title, ...body) { return el("section", {"data-section": title}, el("h2", {}, title), ...body); }

function when(t) { return t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z" : ""; }

function token() {
  const m = location.hash.match(/[#&]token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("nephoscope-token", decodeURIComponent(m[1]));
    location.hash = location.hash.replace(/[#&]?token=[^&]+/, "") || "#/";
  }
  return sessionStorage.getItem("nephoscope-token");
}

async function api(path) {
  const resp = await fetch(API + path, {headers: {"Authorization": "Bearer " + token()}});
  if (resp.status === 401) { sessionStorage.removeItem("nephoscope-token"); throw new Error("token refused"); }
  if (!resp.ok) throw new Error(`${path}: ${resp.status}`);
  return resp.json();
}

function login(app, message) {
  const input = el("input", {type: "password", id: "token", size: "50", placeholder: "API token"});
  const form = el("form", {id: "login"}, el("label", {}, "Token ", input), " ", el("button", {type: "submit"}, "Open"));
  form.addEventListener("submit", ev => {
    ev.preventDefault();
    sessionStorage.setItem("nephoscope-token", input.value.trim());
    route();
  });
  app.replaceChildren(el("h1", {}, "Sign in"), message ? el("p", {class: "error"}, message) : "", form);
}

function riskCell(n) { return el("span", {class: n ? "bad" : "ok"}, String(n || 0)); }

function groupTable(groups, label) {
  return table([label, "VMs", ...RISKS.map(r => r[1])],
               Object.entries(groups).map(([name, g]) => [name, String(g.vms), ...RISKS.map(r => riskCell(g[r[0]]))]));
}

async function overview(app, params) {
  const [ov, vms] = await Promise.all([api("/overview"), api("/vms" + (params.toString() ? "?" + params : ""))]);
  const cards = el("div", {class: "cards"}, el("div", {class: "card"}, el("b", {}, String(ov.vms)), "VMs"),
                   RISKS.map(([k, label]) => el("div", {class: "card", "data-risk": k},
                                                el("b", {class: ov.totals[k] ? "bad" : "ok"}, String(ov.totals[k])),
                                                label)));
  const pick = (name, options) => el("select", {name}, el("option", {value: ""}, "any"),
    options.map(o => { const opt = el("option", {value: o[0]}, o[1]); if (params.get(name) === o[0]) opt.selected = true; return opt; }));
  // A tenant's token reads no host (by_host and each VM's host are null): no host filter, column or section.
  const hosts = ov.by_host !== null && ov.by_host !== undefined;
  const filters = el("form", {class: "filters", id: "filters"},
    hosts ? el("label", {}, "host ", pick("host", Object.keys(ov.by_host).map(h => [h, h]))) : "",
    el("label", {}, "tenant ", pick("tenant", Object.keys(ov.by_tenant).filter(t => t !== "(no tenant)").map(t => [t, t]))),
    el("label", {}, "risk ", pick("risk", RISKS)), el("button", {type: "submit"}, "Filter"));
  filters.addEventListener("submit", ev => {
    ev.preventDefault();
    const p = new URLSearchParams();
    for (const s of filters.querySelectorAll("select")) if (s.value) p.set(s.name, s.value);
    location.hash = "#/?" + p;
  });
  const rows = vms.map(v => [el("a", {href: `#/vm/${v.id}`}, v.name), ...(hosts ? [v.host || ""] : []), v.tenant || "—",
                             ...RISKS.map(r => riskCell(v.risk[r[0]])), v.high_risk ? "yes" : ""]);
  app.replaceChildren(el("h1", {}, "Fleet overview"), cards,
    hosts ? section("VMs by risk per host", groupTable(ov.by_host, "host")) : "",
    section("VMs by risk per tenant", groupTable(ov.by_tenant, "tenant")),
    section("VMs", filters, table(["VM", ...(hosts ? ["host"] : []), "tenant", ...RISKS.map(r => r[1]), "high-risk"],
                                  rows)),
    section("Evaluation charts", none("run `nephoscope evaluate` locally; charts are not served yet")));
}

function evidence(seen) { return Object.entries(seen || {}).map(([m, v]) => `${m}: ${v}`).join(", "); }

async function vmPage(app, id) {
  const [vm, findings, notices] = await Promise.all([api(`/vms/${id}`), api(`/vms/${id}/findings`),
                                                     api(`/vms/${id}/notices`)]);
  const doc = (vm.latest && vm.latest.document) || {};
  const scan = doc.scan || {};
  const report = doc.report || {};
  const procs = (scan.processes || []).map(p => [String(p.pid), p.comm || "", p.exe || "",
    el("span", {class: p.verdict === "verified" ? "ok" : "warn"}, p.verdict || ""), evidence(p.seen_by),
    p.code && p.code.main ? `${p.code.main.path || ""} ${p.code.main.package || ""}`.trim() : ""]);
  const vulns = (report.vulnerable || []).filter(v => v.running).map(v => [v.package, (v.versions || []).join(", "),
    v.fixed_version || "no fix yet", (v.cves || []).map(c => c.id || c.cve || JSON.stringify(c)).join(", "), v.evidence || ""]);
  const code = (report.code || []).map(c => [el("span", {class: "bad"}, c.severity), c.kind, c.title,
                                             (c.methods || []).join(", ")]);
  const over = findings.map(f => [when(f.time), f.severity, f.kind, f.title]);
  const unver = (report.unverified || scan.unverifiable || []).map(u => [u.what || "", u.method || "", u.reason || ""]);
  app.replaceChildren(
    el("h1", {}, "VM ", el("span", {id: "vm-name"}, vm.name)),
    el("p", {}, vm.host ? `host ${vm.host} · ` : "", `tenant ${vm.tenant || "—"} · `,
       vm.latest ? `latest scan ${when(vm.latest.finished)} by ${(vm.latest.methods || []).join(", ")} (${vm.latest.status})`
                 : "never scanned"),
    el("div", {class: "cards"}, RISKS.map(([k, label]) => el("div", {class: "card"}, el("b", {class: vm.risk[k] ? "bad" : "ok"},
                                                                                      String(vm.risk[k] || 0)), label))),
    section("What runs", table(["pid", "name", "executable", "verdict", "evidence per method", "main binary"], procs)),
    section("Running vulnerable packages", table(["package", "versions", "fixed in", "CVEs", "evidence"], vulns)),
    section("Malicious or unknown code", table(["severity", "kind", "what", "methods"], code)),
    section("Findings over time", table(["time", "severity", "kind", "title"], over)),
    section("Could not be verified", table(["what", "method", "reason"], unver)),
    ...responseSections(notices));
}

// Filters in force, filter changes and notices as the VM's sensor reported them. A tenant's token gets a
// whitelisted view (no rules, tap or operator); the operator's also carries those, shown in extra columns.
function responseSections(r) {
  if (!r.recorded) return [section("Filters", none("this VM's sensor has not reported them")),
                           section("Notices", none("this VM's sensor has not reported them"))];
  const ops = r.view === "operator";
  const list = xs => (xs || []).join("\n");
  const filters = r.filters.map(f => [f.cve || "", f.mitigation || "", `${f.package || ""} ${f.version || ""}`.trim(),
    `${f.kind || ""} · port(s) ${(f.ports || []).join(", ")}`, when(f.applied_at), f.does || "", f.does_not_stop || "",
    ...(ops ? [(f.net && f.net.tap) || "", el("pre", {}, list(f.rules))] : [])]);
  const audit = r.audit.map(a => [when(a.at), a.action || "", a.cve || "", a.mitigation || "", a.reason || "",
                                  ...(ops ? [a.who || ""] : [])]);
  const notices = r.notices.map(n => [when(n.created), n.event || "", n.channel || "",
    el("span", {class: n.status === "sent" ? "ok" : n.status === "failed" ? "bad" : "warn"}, n.status || ""),
    String(n.attempts ?? ""), when(n.sent), ...(ops ? [n.target || "", n.last_error || ""] : [])]);
  return [
    section("Filters",
      filters.length ? table(["CVE", "filter", "package", "what", "applied", "what it does", "what it does not stop",
                              ...(ops ? ["tap", "rules"] : [])], filters) : el("p", {class: "none"}, "none in force"),
      el("h3", {}, "Filter changes"),
      audit.length ? table(["time", "action", "CVE", "filter", "why", ...(ops ? ["by"] : [])], audit)
                   : el("p", {class: "none"}, "no change recorded")),
    section("Notices", notices.length ? table(["created", "event", "channel", "status", "attempts", "delivered",
                                               ...(ops ? ["to", "last error"] : [])], notices)
                                      : el("p", {class: "none"}, "none sent"))];
}

async function route() {
  const app = document.getElementById("app");
  if (!token()) { login(app); return; }
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  try {
    const m = path.match(/^\/vm\/(\d+)$/);
    if (m) await vmPage(app, m[1]); else await overview(app, new URLSearchParams(query || ""));
    document.getElementById("who").textContent = "signed in";
  } catch (err) {
    if (!token()) login(app, String(err.message)); else app.replaceChildren(el("p", {class: "error"}, String(err.message)));
  }
}

window.addEventListener("hashchange", route);
route();
