/* virtwarden's Cockpit page.
 *
 * Reads the status file `virtwarden run` writes (<stateDir>/status.json, replaced by rename on
 * every change) through Cockpit's bridge and re-renders whenever it changes. Reading is
 * level-triggered, like the service itself: a change seen in the state directory, a timer and the
 * page load each lead to one fresh read, and a read that does not answer is abandoned and tried
 * again, so no lost event or stuck channel can leave the page on "Reading…"; lifts a quarantine with `virtwarden release NAME`; runs
 * `virtwarden diagnose NAME --output json` for a failing domain. Settings come from this
 * package's manifest "config", which an administrator overrides in
 * /etc/cockpit/virtwarden.override.json ({"config": {"stateDir": ..., "command": [...]}}).
 * Everything from the status file or a command is put in the page as text, never as HTML.
 */
(function () {
    "use strict";

    const _ = cockpit.gettext;

    const config = {
        stateDir: "/run/virtwarden",
        command: ["virtwarden"],
        environ: [],
        diagnoseArgs: [],
    };

    let report = null;
    /* name -> {key, manual, state: "running"|"done"|"failed", report, error}; `manual` when asked
     * for with the button (shown until the page reloads), else shown while the domain fails. */
    const diagnoses = {};
    /* name -> true while its release runs */
    const releasing = {};

    function $(id) {
        return document.getElementById(id);
    }

    /* A DOM element: h("td", {class: "x", "data-label": "State"}, "text", child, ...). */
    function h(tag, attrs) {
        const e = document.createElement(tag);
        for (const [k, v] of Object.entries(attrs || {})) {
            if (v === undefined || v === null || v === false)
                continue;
            if (k === "onclick")
                e.addEventListener("click", v);
            else
                e.setAttribute(k, v === true ? "" : String(v));
        }
        for (const c of Array.prototype.slice.call(arguments, 2).flat()) {
            if (c === undefined || c === null || c === false)
                continue;
            e.append(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
        }
        return e;
    }

    function label(text, color, extra) {
        return h("span", { class: "pf-v5-c-label pf-m-compact pf-m-" + color + (extra ? " " + extra : "") },
                 h("span", { class: "pf-v5-c-label__content" }, text));
    }

    function ago(iso) {
        if (!iso)
            return "";
        const t = Date.parse(iso);
        if (isNaN(t))
            return iso;
        const s = Math.max(0, Math.round((Date.now() - t) / 1000));
        if (s < 60)
            return cockpit.format(_("$0 s ago"), s);
        if (s < 3600)
            return cockpit.format(_("$0 min ago"), Math.round(s / 60));
        if (s < 86400)
            return cockpit.format(_("$0 h ago"), Math.round(s / 3600));
        return new Date(t).toLocaleString();
    }

    function time(iso) {
        return iso ? h("time", { datetime: iso, title: iso }, ago(iso)) : null;
    }

    function message(kind, text) {
        const box = $("messages");
        const alert = h("div", { class: "pf-v5-c-alert pf-m-inline pf-m-" + kind, "data-kind": kind },
                        h("p", { class: "pf-v5-c-alert__title" }, text),
                        h("button", {
                            class: "pf-v5-c-button pf-m-plain vw-close",
                            "aria-label": _("Close"),
                            onclick: () => alert.remove(),
                        }, "×"));
        box.prepend(alert);
    }

    /* ---- settings ---- */

    /* How long the settings fetch and a status read may take before they are given up (and the
     * read tried again), and how often the status is read even when no change was seen. */
    const CONFIG_TIMEOUT_MS = 5000;
    const READ_TIMEOUT_MS = 5000;
    const REREAD_MS = 10000;

    function loadConfig() {
        /* manifests.json holds every package's manifest with the administrator's overrides. A
         * fetch that never answers must not keep the page from reading the status: defaults. */
        const abort = new AbortController();
        window.setTimeout(() => abort.abort(), CONFIG_TIMEOUT_MS);
        return fetch("../manifests.json", { credentials: "same-origin", signal: abort.signal })
                .then(r => r.ok ? r.json() : {})
                .then(m => {
                    const c = (m && m.virtwarden && m.virtwarden.config) || {};
                    if (typeof c.stateDir === "string" && c.stateDir)
                        config.stateDir = c.stateDir.replace(/\/+$/, "");
                    if (Array.isArray(c.command) && c.command.length)
                        config.command = c.command.map(String);
                    if (Array.isArray(c.environ))
                        config.environ = c.environ.map(String);
                    if (Array.isArray(c.diagnoseArgs))
                        config.diagnoseArgs = c.diagnoseArgs.map(String);
                })
                .catch(ex => console.warn("virtwarden: cannot read the manifest config, using defaults:", ex));
    }

    function statusPath() {
        return config.stateDir + "/status.json";
    }

    function run(args, superuser) {
        return cockpit.spawn(config.command.concat(args),
                             { superuser, err: "message", environ: config.environ });
    }

    /* ---- status ---- */

    function isFailing(d) {
        const phase = d.health && d.health.phase;
        return !!(d.quarantined || d.lastError || d.diagnosis || phase === "unhealthy" || phase === "boot-failed");
    }

    /* What makes a failure new: a new one is diagnosed again. */
    function failureKey(d) {
        return [d.quarantinedSince, d.lastFailureAt, d.lastError, d.health && d.health.phase].join("|");
    }

    function connectionOf(uri) {
        return /^qemu(\+\w+)?:\/\/[^/]*\/session/.test(uri || "") ? "session" : "system";
    }

    function machinesLink(name) {
        const path = "/machines#vm?name=" + encodeURIComponent(name) + "&connection=" + connectionOf(report && report.uri);
        return h("a", {
            class: "vw-machines",
            href: path,
            title: _("Open in Virtual machines"),
            onclick: ev => {
                /* Inside Cockpit's shell the page is a frame: ask the shell to navigate. */
                if (window.parent !== window) {
                    ev.preventDefault();
                    cockpit.jump(path);
                }
            },
        }, _("Virtual machine"));
    }

    function healthCell(d) {
        if (!d.health)
            return h("span", { class: "vw-muted" }, _("not probed"));
        const phase = d.health.phase;
        const color = { healthy: "green", booting: "blue", unhealthy: "orange", "boot-failed": "red", suspended: "purple" }[phase] || "grey";
        return h("span", {},
                 label(phase === "boot-failed" ? _("boot failed") : phase, color, "vw-health-phase"),
                 d.health.detail ? h("span", { class: "vw-detail" }, " " + d.health.detail) : null);
    }

    function quarantineCell(d) {
        if (!d.quarantined)
            return h("span", { class: "vw-muted" }, _("no"));
        return h("div", {},
                 label(_("quarantined"), "red"),
                 d.quarantinedSince ? h("span", { class: "vw-muted" }, " ", time(d.quarantinedSince)) : null,
                 h("div", { class: "vw-reason" }, d.quarantined));
    }

    function release(name) {
        releasing[name] = true;
        render();
        run(["release", "--state-dir", config.stateDir, "--", name], "require")
                .then(out => message("success", (out || "").trim() || cockpit.format(_("released $0"), name)))
                .catch((ex, out) => message("danger", cockpit.format(_("Cannot release $0: $1"), name,
                                                                     ex.message || (out || "").trim() || String(ex))))
                .finally(() => {
                    delete releasing[name];
                    render();
                });
    }

    function diagnose(name, key, manual) {
        diagnoses[name] = { key, manual, state: "running" };
        render();
        const done = (out) => {
            try {
                const rep = JSON.parse(out);
                diagnoses[name] = { key, manual, state: "done", report: (rep.domains || []).find(x => x.domain === name) || null };
            } catch (ex) {
                diagnoses[name] = { key, manual, state: "failed", error: String(ex) };
            }
            render();
        };
        run(["diagnose", "--output", "json"].concat(config.diagnoseArgs, ["--", name]), "try")
                .then(done)
                /* Exit 3 means problems were found: the findings are on stdout all the same. */
                .catch((ex, out) => {
                    if (ex && ex.exit_status === 3 && out)
                        return done(out);
                    diagnoses[name] = { key, manual, state: "failed", error: ex.message || String(ex) };
                    render();
                });
    }

    function findingsView(name) {
        const d = diagnoses[name];
        if (!d)
            return null;
        if (d.state === "running")
            return h("p", { class: "vw-muted vw-diagnose", "data-state": "running" }, _("Running virtwarden diagnose…"));
        if (d.state === "failed")
            return h("p", { class: "vw-diagnose", "data-state": "failed" }, _("virtwarden diagnose failed: "), d.error);
        const findings = (d.report && d.report.findings) || [];
        if (!findings.length)
            return h("p", { class: "vw-diagnose", "data-state": "done" }, _("virtwarden diagnose found nothing wrong."));
        return h("div", { class: "vw-diagnose", "data-state": "done" },
                 h("h3", { class: "pf-v5-c-title pf-m-md" }, _("virtwarden diagnose")),
                 h("ul", { class: "vw-findings" }, findings.map(f =>
                     h("li", { class: "vw-finding", "data-severity": f.severity },
                       label(f.severity, f.severity === "error" ? "red" : "orange"),
                       " ", h("strong", {}, f.check), " ", h("span", { class: "vw-what" }, f.what),
                       f.evidence ? h("div", { class: "vw-muted" }, f.evidence) : null,
                       f.fix ? h("div", { class: "vw-fix" }, _("Fix: "), f.fix) : null))));
    }

    function detailsRow(d) {
        const facts = [];
        const fact = (k, v) => v && facts.push(h("div", { class: "vw-fact" }, h("span", { class: "vw-fact-key" }, k), " ", v));
        if (d.quarantined)
            fact(_("Once fixed:"), h("code", {}, "virtwarden release " + d.name));
        fact(_("Last error:"), d.lastError);
        fact(_("Diagnosis:"), d.diagnosis);
        if (d.health && d.health.lastProbe)
            fact(_("Last probe:"), (d.health.lastProbeOk ? _("passed: ") : _("failed: ")) + d.health.lastProbe);
        fact(_("Hook refused:"), d.refusedHook);
        fact(_("Remembered:"), d.remembered);
        for (const f of d.flapping || [])
            fact(_("Conflict:"), f);
        for (const n of d.notes || [])
            fact(_("Note:"), n);
        return h("tr", { class: "vw-details", "data-details-for": d.name },
                 h("td", { colspan: 8 }, facts, findingsView(d.name)));
    }

    function domainRow(d) {
        const actions = [];
        if (d.quarantined) {
            actions.push(h("button", {
                class: "pf-v5-c-button pf-m-primary pf-m-small",
                "data-action": "release",
                disabled: !!releasing[d.name],
                title: _("Lift the quarantine: virtwarden restarts the domain again (fix the cause first)"),
                onclick: () => release(d.name),
            }, releasing[d.name] ? _("Releasing…") : _("Release")));
        }
        actions.push(h("button", {
            class: "pf-v5-c-button pf-m-secondary pf-m-small",
            "data-action": "diagnose",
            disabled: diagnoses[d.name] && diagnoses[d.name].state === "running",
            onclick: () => diagnose(d.name, failureKey(d), true),
        }, _("Diagnose")));
        actions.push(machinesLink(d.name));
        return h("tr", { "data-domain": d.name, class: isFailing(d) ? "vw-failing" : null },
                 h("th", { "data-label": _("Domain"), scope: "row", class: "vw-name" }, d.name),
                 h("td", { "data-label": _("Policy"), class: "vw-policy" }, d.policy),
                 h("td", { "data-label": _("State"), class: "vw-state" }, d.state),
                 h("td", { "data-label": _("Health"), class: "vw-health" }, healthCell(d)),
                 h("td", { "data-label": _("Restarts"), class: "vw-restarts" }, String(d.restarts || 0)),
                 h("td", { "data-label": _("Last failure"), class: "vw-failure" },
                   d.lastFailure ? [d.lastFailure, " ", time(d.lastFailureAt)] : h("span", { class: "vw-muted" }, "—")),
                 h("td", { "data-label": _("Quarantine"), class: "vw-quarantine" }, quarantineCell(d)),
                 h("td", { class: "vw-actions" }, actions));
    }

    function renderService(r) {
        const dl = $("service-facts");
        dl.replaceChildren();
        const item = (term, ...desc) => dl.append(h("div", { class: "pf-v5-c-description-list__group" },
                                                   h("dt", { class: "pf-v5-c-description-list__term" }, term),
                                                   h("dd", { class: "pf-v5-c-description-list__description" }, desc)));
        item(_("libvirt"), label(r.connected ? _("connected") : _("DISCONNECTED"), r.connected ? "green" : "red", "vw-connected"),
             " ", h("code", {}, r.uri));
        item(_("Ready"), label(r.ready ? _("ready") : _("not ready"), r.ready ? "green" : "orange", "vw-ready"));
        const counts = {};
        for (const d of r.domains || [])
            counts[d.policy] = (counts[d.policy] || 0) + 1;
        item(_("Policies"), (r.policies || []).length
            ? h("span", { class: "vw-policies" }, r.policies.map(p =>
                h("span", { class: "pf-v5-c-label pf-m-compact pf-m-outline vw-policy-chip", "data-policy": p },
                  h("span", { class: "pf-v5-c-label__content" },
                    cockpit.format(cockpit.ngettext("$0: $1 domain", "$0: $1 domains", counts[p] || 0), p, counts[p] || 0)))))
            : _("none"));
        item(_("Status"), cockpit.format(_("pid $0, updated "), r.pid), time(r.updated), " ", h("code", {}, statusPath()));
        if (r.dataDir)
            item(_("Memory"), h("code", {}, r.dataDir));
        const alerts = $("service-alerts");
        alerts.replaceChildren();
        const alert = (kind, title, body) => alerts.append(h("div", { class: "pf-v5-c-alert pf-m-inline pf-m-" + kind },
                                                             h("p", { class: "pf-v5-c-alert__title" }, title),
                                                             h("pre", { class: "pf-v5-c-alert__description" }, body)));
        if (r.policyError)
            alert("danger", _("The last policy edit was rejected; the previous policy stays in force"), r.policyError);
        if (r.memoryError)
            alert("warning", _("Durable memory problem"), r.memoryError);
    }

    function renderNetwork(n) {
        $("network").hidden = !n;
        if (!n)
            return;
        const body = $("network-body");
        body.replaceChildren();
        const state = n.flapping && n.flapping.length
            ? label(_("conflict: another writer; backing off"), "orange")
            : n.drift && n.drift.length ? label(_("drift, retrying"), "orange") : label(_("in sync"), "green");
        body.append(state);
        const lines = [].concat(n.flapping || [], n.drift || [], n.lastActions || [], n.notes || []);
        if (lines.length)
            body.append(h("ul", { class: "vw-lines" }, lines.map(l => h("li", {}, l))));
    }

    function render() {
        if (!report)
            return;
        $("loading").hidden = true;
        $("missing").hidden = true;
        $("service").hidden = false;
        $("domains").hidden = false;
        renderService(report);
        renderNetwork(report.network);
        const rows = [];
        for (const d of report.domains || []) {
            rows.push(domainRow(d));
            if (isFailing(d) || (diagnoses[d.name] && diagnoses[d.name].manual))
                rows.push(detailsRow(d));
        }
        $("domain-rows").replaceChildren(...rows);
    }

    function showMissing(text) {
        report = null;
        $("loading").hidden = true;
        $("service").hidden = true;
        $("network").hidden = true;
        $("domains").hidden = true;
        $("missing").hidden = false;
        $("missing-detail").textContent = text;
    }

    function onStatus(content, tag, error) {
        if (error) {
            showMissing(cockpit.format(_("Cannot read $0: $1. Is `virtwarden run --state-dir $2` running?"),
                                       statusPath(), error.message || String(error), config.stateDir));
            return;
        }
        if (!content) {
            showMissing(cockpit.format(_("No status file at $0. Start the service (systemctl start virtwarden) or point this page at its --state-dir in /etc/cockpit/virtwarden.override.json."),
                                       statusPath()));
            return;
        }
        report = content;
        render();
        /* A failing domain is diagnosed once per failure. */
        for (const d of report.domains || []) {
            const key = failureKey(d);
            if (isFailing(d) && (!diagnoses[d.name] || diagnoses[d.name].key !== key))
                diagnose(d.name, key, false);
        }
    }

    /* ---- reading the status file ---- */

    let reading = false;
    let readAgain = false;

    /* One fresh read of the status file (a new fsread each time, so no watch state carries
     * over); a change seen meanwhile reads once more afterwards. */
    function readStatus() {
        if (reading) {
            readAgain = true;
            return;
        }
        reading = true;
        const file = cockpit.file(statusPath(), { syntax: JSON, superuser: "try" });
        let settled = false;
        function finish() {
            settled = true;
            file.close();
            reading = false;
            if (readAgain) {
                readAgain = false;
                readStatus();
            }
        }
        const timer = window.setTimeout(() => {
            if (settled)
                return;
            console.warn("virtwarden: reading " + statusPath() + " did not answer; trying again");
            readAgain = true;
            finish();
        }, READ_TIMEOUT_MS);
        file.read()
                .then((content, tag) => {
                    if (settled)
                        return;
                    window.clearTimeout(timer);
                    finish();
                    onStatus(content, tag, null);
                })
                .catch(error => {
                    if (settled)
                        return;
                    window.clearTimeout(timer);
                    finish();
                    onStatus(null, null, error);
                });
    }

    /* Changes are watched on the state directory, not on the file: the file is replaced by
     * rename on every change, so each version is a new inode, while the directory stays. Every
     * event naming the status file (created, moved in, changed, deleted) leads to a read. */
    function watchStateDir() {
        const channel = cockpit.channel({ payload: "fswatch1", path: config.stateDir, superuser: "try" });
        channel.addEventListener("message", (event, data) => {
            let msg = null;
            try {
                msg = JSON.parse(data);
            } catch (e) {
                return;
            }
            if (msg && (msg.path === statusPath() || msg.other === statusPath()))
                readStatus();
        });
        channel.addEventListener("close", (event, options) => {
            /* The directory is missing (service not started yet) or the bridge went away: the
             * timer keeps reading; watch again later. */
            console.info("virtwarden: watch of " + config.stateDir + " closed:", options && options.problem);
            window.setTimeout(watchStateDir, REREAD_MS);
        });
    }

    loadConfig().then(() => {
        document.body.setAttribute("data-config-state-dir", config.stateDir);
        watchStateDir();
        readStatus();
        /* A safety net for missed events; also keeps "… ago" current. */
        window.setInterval(readStatus, REREAD_MS);
    });
    cockpit.translate();
}());
