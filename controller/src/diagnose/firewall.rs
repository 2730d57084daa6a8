//! Does the host firewall drop a VM's bridged traffic? With bridge netfilter on
//! (`net.bridge.bridge-nf-call-iptables = 1`) frames crossing a bridge go through the IPv4
//! FORWARD hook, in and out on the bridge itself. The rules are read from `iptables-save` and
//! `nft -j list ruleset` output and evaluated for that traffic; a rule with a match we cannot
//! decide for it (addresses, conntrack…) is passed over, so only certain drops are reported.

use std::collections::HashMap;

/// Bridged traffic of one VM: in and out on `bridge`, through the port `tap` (when running).
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    pub bridge: &'a str,
    pub tap: Option<&'a str>,
}

/// Whether a match holds for the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holds {
    Yes,
    No,
    Maybe,
}

/// What a chain decided.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Accept,
    Drop(String),
    /// Fell off the end of a user chain, or RETURN.
    Return,
}

/// The direction of the flow being evaluated: from the VM (its tap is the physdev in) or to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    FromVm,
    ToVm,
}

/// The firewall as read from the host.
#[derive(Debug, Clone, Default)]
pub struct Firewall {
    pub iptables: Option<IptablesFilter>,
    pub nft: Vec<NftChain>,
}

impl Firewall {
    /// Parse both outputs. nft tables that iptables-nft also shows (same family and name) are
    /// left to the iptables view, which understands their xt matches.
    pub fn parse(iptables_save: Option<&str>, nft_json: Option<&str>) -> Firewall {
        let iptables = iptables_save.and_then(IptablesFilter::parse);
        let shared = iptables.as_ref().is_some_and(|t| t.nf_tables);
        let mut nft = nft_json.map(parse_nft).unwrap_or_default();
        if shared {
            nft.retain(|c| !(c.family == "ip" && c.table == "filter"));
        }
        Firewall { iptables, nft }
    }

    /// The rule or policy that drops the flow, in words, if one certainly does.
    pub fn drops(&self, flow: Flow) -> Option<String> {
        for dir in [Dir::FromVm, Dir::ToVm] {
            if let Some(t) = &self.iptables {
                if let Some(Outcome::Drop(why)) = t.eval("FORWARD", flow, dir, 0) {
                    return Some(format!("iptables: {why}"));
                }
            }
            for c in self
                .nft
                .iter()
                .filter(|c| c.hook.as_deref() == Some("forward") && matches!(c.family.as_str(), "ip" | "inet"))
            {
                if let Outcome::Drop(why) = nft_eval(&self.nft, c, flow, dir, 0) {
                    return Some(format!("nft: {why}"));
                }
            }
        }
        None
    }
}

fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('+').or_else(|| pattern.strip_suffix('*')) {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

fn known(value: Option<&str>, pattern: &str) -> Holds {
    match value {
        Some(v) if name_matches(pattern, v) => Holds::Yes,
        Some(_) => Holds::No,
        None => Holds::Maybe,
    }
}

fn negate(h: Holds, neg: bool) -> Holds {
    match (h, neg) {
        (Holds::Yes, true) => Holds::No,
        (Holds::No, true) => Holds::Yes,
        (h, _) => h,
    }
}

fn all(parts: impl IntoIterator<Item = Holds>) -> Holds {
    let mut acc = Holds::Yes;
    for p in parts {
        match p {
            Holds::No => return Holds::No,
            Holds::Maybe => acc = Holds::Maybe,
            Holds::Yes => {}
        }
    }
    acc
}

// ---- iptables-save -------------------------------------------------------------------------

/// The `*filter` table of `iptables-save`.
#[derive(Debug, Clone, Default)]
pub struct IptablesFilter {
    /// iptables-nft (its tables are also in nft's ruleset).
    pub nf_tables: bool,
    policies: HashMap<String, String>,
    rules: HashMap<String, Vec<IptRule>>,
}

#[derive(Debug, Clone)]
struct IptRule {
    text: String,
    /// (negated, what, value): `in`, `out`, `physin`, `physout`, `bridged`.
    conds: Vec<(bool, &'static str, String)>,
    /// A match this evaluation does not model (addresses, protocols, conntrack…).
    undecidable: bool,
    target: Option<String>,
}

impl IptRule {
    fn holds(&self, flow: Flow, dir: Dir) -> Holds {
        let mut parts = vec![if self.undecidable { Holds::Maybe } else { Holds::Yes }];
        for (neg, what, value) in &self.conds {
            let h = match (*what, dir) {
                // Bridged traffic enters and leaves through the bridge device itself.
                ("in" | "out", _) => known(Some(flow.bridge), value),
                ("physin", Dir::FromVm) | ("physout", Dir::ToVm) => known(flow.tap, value),
                ("bridged", _) => Holds::Yes,
                _ => Holds::Maybe,
            };
            parts.push(negate(h, *neg));
        }
        all(parts)
    }
}

impl IptablesFilter {
    pub fn parse(text: &str) -> Option<IptablesFilter> {
        let mut t = IptablesFilter { nf_tables: text.contains("(nf_tables)"), ..Default::default() };
        let mut in_filter = false;
        let mut seen = false;
        for line in text.lines() {
            let line = line.trim();
            if let Some(table) = line.strip_prefix('*') {
                in_filter = table == "filter";
                seen |= in_filter;
                continue;
            }
            if !in_filter {
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let mut parts = decl.split_whitespace();
                if let (Some(chain), Some(policy)) = (parts.next(), parts.next()) {
                    t.policies.insert(chain.to_string(), policy.to_string());
                }
            } else if line.starts_with("-A ") {
                if let Some((chain, rule)) = parse_ipt_rule(line) {
                    t.rules.entry(chain).or_default().push(rule);
                }
            }
        }
        seen.then_some(t)
    }

    fn eval(&self, chain: &str, flow: Flow, dir: Dir, depth: usize) -> Option<Outcome> {
        if depth > 16 {
            return None;
        }
        for rule in self.rules.get(chain).map(Vec::as_slice).unwrap_or(&[]) {
            if rule.holds(flow, dir) != Holds::Yes {
                continue;
            }
            match rule.target.as_deref() {
                Some("ACCEPT") => return Some(Outcome::Accept),
                Some("DROP") | Some("REJECT") => return Some(Outcome::Drop(rule.text.clone())),
                Some("RETURN") => return Some(Outcome::Return),
                Some(user) if self.rules.contains_key(user) || self.policies.get(user).is_some_and(|p| p == "-") => {
                    match self.eval(user, flow, dir, depth + 1)? {
                        Outcome::Return => {}
                        decided => return Some(decided),
                    }
                }
                _ => {} // LOG, MARK, … do not decide
            }
        }
        match self.policies.get(chain).map(String::as_str) {
            Some("DROP") => Some(Outcome::Drop(format!(
                ":{chain} DROP (the chain's policy; no rule accepts bridged traffic on {})",
                flow.bridge
            ))),
            Some("ACCEPT") => Some(Outcome::Accept),
            _ => Some(Outcome::Return),
        }
    }
}

/// `-A FORWARD -i br0 ! -o eth0 -m physdev --physdev-is-bridged -j ACCEPT`
fn parse_ipt_rule(line: &str) -> Option<(String, IptRule)> {
    let tokens = shell_words(line);
    let mut it = tokens.iter().map(String::as_str);
    it.next(); // -A
    let chain = it.next()?.to_string();
    let mut rule = IptRule { text: line.to_string(), conds: Vec::new(), undecidable: false, target: None };
    let mut neg = false;
    while let Some(tok) = it.next() {
        let what = match tok {
            "!" => {
                neg = true;
                continue;
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                // iptables-save writes the target last; what follows are its own options.
                rule.target = it.next().map(str::to_string);
                break;
            }
            "-i" | "--in-interface" => Some("in"),
            "-o" | "--out-interface" => Some("out"),
            "--physdev-in" => Some("physin"),
            "--physdev-out" => Some("physout"),
            "--physdev-is-bridged" => {
                rule.conds.push((neg, "bridged", String::new()));
                None
            }
            "-m" | "--match" => {
                if !matches!(it.next(), Some("physdev" | "comment")) {
                    rule.undecidable = true;
                }
                None
            }
            "--comment" => {
                it.next();
                None
            }
            _ if tok.starts_with('-') => {
                rule.undecidable = true;
                None
            }
            _ => None,
        };
        if let Some(what) = what {
            rule.conds.push((neg, what, it.next().unwrap_or("").to_string()));
        }
        neg = false;
    }
    Some((chain, rule))
}

/// Split a line into words, honouring double quotes (comments).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

// ---- nftables ------------------------------------------------------------------------------

/// One nft chain with its rules (kept as JSON expressions).
#[derive(Debug, Clone, Default)]
pub struct NftChain {
    pub family: String,
    pub table: String,
    pub name: String,
    pub hook: Option<String>,
    pub policy: Option<String>,
    rules: Vec<(u64, Vec<serde_json::Value>)>,
}

/// Parse `nft -j list ruleset`; malformed input gives no chains.
pub fn parse_nft(text: &str) -> Vec<NftChain> {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(text) else { return Vec::new() };
    let Some(items) = doc.get("nftables").and_then(|v| v.as_array()) else { return Vec::new() };
    let s = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    let mut chains: Vec<NftChain> = Vec::new();
    for item in items {
        if let Some(c) = item.get("chain") {
            chains.push(NftChain {
                family: s(c, "family"),
                table: s(c, "table"),
                name: s(c, "name"),
                hook: c.get("hook").and_then(|h| h.as_str()).map(str::to_string),
                policy: c.get("policy").and_then(|h| h.as_str()).map(str::to_string),
                rules: Vec::new(),
            });
        } else if let Some(r) = item.get("rule") {
            let (family, table, chain) = (s(r, "family"), s(r, "table"), s(r, "chain"));
            let handle = r.get("handle").and_then(|h| h.as_u64()).unwrap_or(0);
            let expr = r.get("expr").and_then(|e| e.as_array()).cloned().unwrap_or_default();
            if let Some(c) = chains.iter_mut().find(|c| c.family == family && c.table == table && c.name == chain) {
                c.rules.push((handle, expr));
            }
        }
    }
    chains
}

fn nft_eval(all_chains: &[NftChain], chain: &NftChain, flow: Flow, dir: Dir, depth: usize) -> Outcome {
    if depth > 16 {
        return Outcome::Return;
    }
    let here = format!("table {} {} chain {}", chain.family, chain.table, chain.name);
    for (handle, expr) in &chain.rules {
        let mut parts = Vec::new();
        let mut verdict: Option<(&str, Option<String>)> = None;
        for e in expr {
            let Some((key, value)) = e.as_object().and_then(|o| o.iter().next()) else { continue };
            match key.as_str() {
                "match" => parts.push(nft_match(value, flow, dir)),
                "counter" | "log" | "comment" | "limit" => {}
                "accept" | "drop" | "return" => verdict = Some((key.as_str(), None)),
                "reject" => verdict = Some(("drop", None)),
                "jump" | "goto" => {
                    verdict = Some(("jump", value.get("target").and_then(|t| t.as_str()).map(str::to_string)))
                }
                _ => parts.push(Holds::Maybe),
            }
        }
        if all(parts) != Holds::Yes {
            continue;
        }
        match verdict {
            Some(("accept", _)) => return Outcome::Accept,
            Some(("drop", _)) => return Outcome::Drop(format!("{here} rule handle {handle} drops it")),
            Some(("return", _)) => return Outcome::Return,
            Some(("jump", Some(target))) => {
                if let Some(c) =
                    all_chains.iter().find(|c| c.family == chain.family && c.table == chain.table && c.name == target)
                {
                    match nft_eval(all_chains, c, flow, dir, depth + 1) {
                        Outcome::Return => {}
                        decided => return decided,
                    }
                }
            }
            _ => {}
        }
    }
    match chain.policy.as_deref() {
        Some("drop") if chain.hook.is_some() => {
            Outcome::Drop(format!("{here} policy drop (no rule accepts bridged traffic on {})", flow.bridge))
        }
        Some(_) if chain.hook.is_some() => Outcome::Accept,
        _ => Outcome::Return,
    }
}

/// `{"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "br0"}`
fn nft_match(m: &serde_json::Value, flow: Flow, dir: Dir) -> Holds {
    let key = m.pointer("/left/meta/key").and_then(|k| k.as_str());
    let op = m.get("op").and_then(|o| o.as_str()).unwrap_or("==");
    let values: Vec<&str> = match m.get("right") {
        Some(serde_json::Value::String(s)) => vec![s.as_str()],
        Some(v) => v
            .get("set")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let subject = match (key, dir) {
        (Some("iifname") | Some("oifname"), _) => Some(flow.bridge),
        (Some("ibrname") | Some("obrname"), _) => Some(flow.bridge),
        _ => return Holds::Maybe,
    };
    if values.is_empty() {
        return Holds::Maybe;
    }
    let hit = values.iter().any(|v| subject.is_some_and(|s| name_matches(v, s)));
    match op {
        "==" | "in" => {
            if hit {
                Holds::Yes
            } else {
                Holds::No
            }
        }
        "!=" => {
            if hit {
                Holds::No
            } else {
                Holds::Yes
            }
        }
        _ => Holds::Maybe,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOW: Flow = Flow { bridge: "br0", tap: Some("vnet0") };

    fn ipt(body: &str) -> Firewall {
        let text =
            format!("# Generated by iptables-save v1.8.9 (nf_tables)\n*filter\n:INPUT ACCEPT [0:0]\n{body}\nCOMMIT\n");
        Firewall::parse(Some(&text), None)
    }

    #[test]
    fn forward_policy_drop_without_an_accepting_rule() {
        let fw = ipt(":FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]");
        assert_eq!(
            fw.drops(FLOW).as_deref(),
            Some("iptables: :FORWARD DROP (the chain's policy; no rule accepts bridged traffic on br0)")
        );
        assert_eq!(ipt(":FORWARD ACCEPT [0:0]").drops(FLOW), None);
    }

    #[test]
    fn accepting_rules_for_the_bridge_or_bridged_traffic_save_it() {
        for rule in [
            "-A FORWARD -i br0 -o br0 -j ACCEPT",
            "-A FORWARD -i br+ -j ACCEPT",
            "-A FORWARD -m physdev --physdev-is-bridged -j ACCEPT",
            "-A FORWARD -j USER\n-A USER -o br0 -j ACCEPT",
        ] {
            let fw = ipt(&format!(":FORWARD DROP [0:0]\n:USER - [0:0]\n{rule}"));
            assert_eq!(fw.drops(FLOW), None, "{rule}");
        }
    }

    #[test]
    fn docker_style_chains_still_drop_a_libvirt_bridge() {
        let fw = ipt(":FORWARD DROP [0:0]\n:DOCKER-USER - [0:0]\n:DOCKER - [0:0]\n\
             -A FORWARD -j DOCKER-USER\n\
             -A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
             -A FORWARD -o docker0 -j DOCKER\n\
             -A FORWARD -i docker0 ! -o docker0 -j ACCEPT\n\
             -A DOCKER-USER -j RETURN");
        assert!(fw.drops(FLOW).unwrap().starts_with("iptables: :FORWARD DROP"));
    }

    #[test]
    fn explicit_drop_rules_and_conditional_ones() {
        let fw = ipt(":FORWARD ACCEPT [0:0]\n-A FORWARD -m physdev --physdev-in vnet0 -j DROP");
        assert_eq!(fw.drops(FLOW).as_deref(), Some("iptables: -A FORWARD -m physdev --physdev-in vnet0 -j DROP"));
        // An address match may or may not apply: not reported.
        let fw = ipt(":FORWARD ACCEPT [0:0]\n-A FORWARD -s 10.0.0.0/8 -j DROP\n-A FORWARD -i eth0 -j DROP");
        assert_eq!(fw.drops(FLOW), None);
        // Quoted comments are words, not options.
        let fw = ipt(":FORWARD ACCEPT [0:0]\n-A FORWARD -i br0 -m comment --comment \"no -s here\" -j REJECT --reject-with icmp-port-unreachable");
        assert!(fw.drops(FLOW).is_some());
    }

    const NFT: &str = r#"{"nftables": [
      {"metainfo": {"version": "1.0.6"}},
      {"table": {"family": "inet", "name": "fw", "handle": 1}},
      {"chain": {"family": "inet", "table": "fw", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
      {"chain": {"family": "inet", "table": "fw", "name": "vms", "handle": 2}},
      {"rule": {"family": "inet", "table": "fw", "chain": "forward", "handle": 3, "expr": [
         {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}},
      {"rule": {"family": "inet", "table": "fw", "chain": "forward", "handle": 4, "expr": [{"jump": {"target": "vms"}}]}},
      {"rule": {"family": "inet", "table": "fw", "chain": "vms", "handle": 5, "expr": [
         {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "br1"}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}}
    ]}"#;

    #[test]
    fn nft_base_chain_policy_and_jumps() {
        let fw = Firewall::parse(None, Some(NFT));
        assert_eq!(
            fw.drops(FLOW).as_deref(),
            Some("nft: table inet fw chain forward policy drop (no rule accepts bridged traffic on br0)")
        );
        assert_eq!(fw.drops(Flow { bridge: "br1", tap: None }), None);
        assert!(Firewall::parse(None, Some("not json")).nft.is_empty());
    }

    #[test]
    fn iptables_nft_tables_are_read_once() {
        let nft = r#"{"nftables": [{"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "hook": "forward", "policy": "drop"}},
          {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 2, "expr": [{"xt": {"type": "match", "name": "physdev"}}, {"accept": null}]}}]}"#;
        let ipt = "# Generated by iptables-save v1.8.9 (nf_tables)\n*filter\n:FORWARD DROP [0:0]\n-A FORWARD -m physdev --physdev-is-bridged -j ACCEPT\nCOMMIT\n";
        assert_eq!(Firewall::parse(Some(ipt), Some(nft)).drops(FLOW), None);
    }
}
