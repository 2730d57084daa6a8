//! Checks of `startup:` (issue 13): per domain (paths, delay, self-dependency) and across every
//! merged document (`after` names a managed domain, order groups allow the wait, no cycle).
//! Host files and the Kubernetes operator both call [`check_dependencies`] after merging.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use crate::duration::Duration;
use crate::merge::Site;
use crate::startup::Startup;
use crate::types::{DomainPolicy, HostPolicy};
use crate::validate::Issue;

/// The longest `delay` accepted: a longer one holds every later order group for that long,
/// which is almost certainly a typo (`30m` for `30s`).
// A shared duration-bound helper is being added to validate.rs by another change; until it
// lands this local bound does the job.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);

/// Per-domain checks of `startup` (no other domain needed). `at` is the domain's path.
pub fn validate_startup(at: &str, d: &DomainPolicy, issues: &mut Vec<Issue>) {
    let Some(s) = &d.startup else { return };
    let mut seen = HashSet::new();
    for (j, dep) in s.after.iter().enumerate() {
        let here = format!("{at}.startup.after[{j}]");
        if dep.is_empty() {
            issues
                .push(Issue::new(here, "`after` holds an empty domain name").hint("name a domain some policy manages"));
        } else if *dep == d.name {
            issues.push(
                Issue::new(here, format!("domain `{dep}` cannot start after itself"))
                    .hint("`after` lists other domains that must run first; remove this one"),
            );
        } else if !seen.insert(dep.as_str()) {
            issues.push(Issue::new(here, format!("`{dep}` is listed twice in `after`")).hint("remove the duplicate"));
        }
    }
    if let Some(delay) = s.delay {
        if delay > MAX_DELAY {
            issues.push(
                Issue::new(
                    format!("{at}.startup.delay"),
                    format!("delay {delay} is longer than the maximum {MAX_DELAY}"),
                )
                .hint("the delay holds every later order group; use seconds or minutes, e.g. `delay: 30s`"),
            );
        }
    }
    let paths = s.requires.as_ref().map(|r| r.paths.as_slice()).unwrap_or_default();
    let mut seen = HashSet::new();
    for (k, path) in paths.iter().enumerate() {
        let here = format!("{at}.startup.requires.paths[{k}]");
        if !path.starts_with('/') {
            issues.push(
                Issue::new(here, format!("required path `{path}` is not absolute"))
                    .hint("write the full path, e.g. /mnt/images/web1.qcow2"),
            );
        } else if let Some(c) = path.chars().find(|c| c.is_control()) {
            issues.push(
                Issue::new(here, format!("required path `{}` contains {c:?}", path.escape_debug()))
                    .hint("write the path as the file system shows it"),
            );
        } else if !seen.insert(path.as_str()) {
            issues.push(Issue::new(here, format!("path `{path}` is listed twice")).hint("remove the duplicate"));
        }
    }
}

/// A start dependency that can never be met, found across the merged documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependencyIssue {
    /// The offending `after` entry.
    pub site: Site,
    pub message: String,
    pub hint: String,
    /// Every document the problem involves (indexes into the slice given to
    /// [`check_dependencies`]), sorted: the operator reports it on each of them.
    pub documents: Vec<usize>,
}

/// A managed domain's place in the documents.
struct Node<'a> {
    document: usize,
    index: usize,
    spec: &'a DomainPolicy,
}

impl Node<'_> {
    fn after_site(&self, j: usize) -> Site {
        Site { document: self.document, path: format!("spec.domains[{}].startup.after[{j}]", self.index) }
    }

    fn startup(&self) -> Option<&Startup> {
        self.spec.startup.as_ref()
    }
}

/// Where a domain's order group sits: its `order`, or after every ordered group.
fn rank(spec: &DomainPolicy) -> u64 {
    spec.startup.as_ref().and_then(|s| s.order).map_or(u64::MAX, u64::from)
}

fn order_text(spec: &DomainPolicy) -> String {
    match spec.startup.as_ref().and_then(|s| s.order) {
        Some(o) => format!("order {o}"),
        None => "no order, so it starts after all ordered domains".into(),
    }
}

/// Cross-document checks of `startup.after` over all documents that merge into one desired
/// state: each entry names a managed domain, in the same or an earlier order group, and the
/// waits form no cycle. Self-dependencies are reported by [`validate_startup`].
pub fn check_dependencies(docs: &[HostPolicy]) -> Vec<DependencyIssue> {
    // The first declaration of a name wins; merge reports duplicates.
    let mut nodes: Vec<Node> = Vec::new();
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    for (document, doc) in docs.iter().enumerate() {
        for (index, spec) in doc.spec.domains.iter().enumerate() {
            if !by_name.contains_key(spec.name.as_str()) {
                by_name.insert(&spec.name, nodes.len());
                nodes.push(Node { document, index, spec });
            }
        }
    }
    let mut issues = Vec::new();
    // Edges that can be met by ordering alone: `from` waits for `to`, from its entry `j`.
    let mut edges: Vec<Vec<(usize, usize)>> = vec![Vec::new(); nodes.len()];
    for (from, node) in nodes.iter().enumerate() {
        let Some(startup) = node.startup() else { continue };
        for (j, dep) in startup.after.iter().enumerate() {
            if dep.is_empty() || *dep == node.spec.name {
                continue;
            }
            let Some(&to) = by_name.get(dep.as_str()) else {
                issues.push(DependencyIssue {
                    site: node.after_site(j),
                    message: format!("`after` names `{dep}`, which no policy manages"),
                    hint: format!(
                        "add `{dep}` to a policy (`state: ignored` is enough to name it) or remove it from `after`"
                    ),
                    documents: vec![node.document],
                });
                continue;
            };
            let target = nodes[to].spec;
            if rank(target) > rank(node.spec) {
                issues.push(DependencyIssue {
                    site: node.after_site(j),
                    message: format!(
                        "`{}` can never start after `{dep}`: `{dep}` is in a later order group ({}) than `{}` ({})",
                        node.spec.name,
                        order_text(target),
                        node.spec.name,
                        order_text(node.spec)
                    ),
                    hint: format!(
                        "an order group starts only after the earlier ones; give `{dep}` an order no higher than `{}`'s",
                        node.spec.name
                    ),
                    documents: vec![node.document],
                });
                continue;
            }
            edges[from].push((to, j));
        }
    }
    for cycle in cycles(&edges) {
        let (first, j) = (cycle[0].0, cycle[0].1);
        let mut names: Vec<&str> = cycle.iter().map(|(n, _)| nodes[*n].spec.name.as_str()).collect();
        names.push(&nodes[first].spec.name);
        let documents: BTreeSet<usize> = cycle.iter().map(|(n, _)| nodes[*n].document).collect();
        issues.push(DependencyIssue {
            site: nodes[first].after_site(j),
            message: format!("dependency cycle: {} (each waits for the next)", names.join(" → ")),
            hint: "remove one of these `after` entries; domains that need each other can share an order group instead"
                .into(),
            documents: documents.into_iter().collect(),
        });
    }
    issues.sort_by(|a, b| (a.site.document, &a.site.path).cmp(&(b.site.document, &b.site.path)));
    issues
}

/// One cycle per strongly connected component with more than one node, as `(node, entry)`
/// steps starting at the component's first node in declaration order; entry `j` of a step is
/// its `after` index pointing at the next step.
fn cycles(edges: &[Vec<(usize, usize)>]) -> Vec<Vec<(usize, usize)>> {
    let mut out = Vec::new();
    for component in strongly_connected(edges) {
        if component.len() < 2 {
            continue;
        }
        let inside: HashSet<usize> = component.iter().copied().collect();
        let Some(&start) = component.iter().min() else { continue };
        // Shortest way back to `start` inside the component (breadth first).
        let mut came_from: HashMap<usize, (usize, usize)> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        let mut closing = None;
        'search: while let Some(n) = queue.pop_front() {
            for &(to, j) in &edges[n] {
                if !inside.contains(&to) {
                    continue;
                }
                if to == start {
                    closing = Some((n, j));
                    break 'search;
                }
                if let std::collections::hash_map::Entry::Vacant(e) = came_from.entry(to) {
                    e.insert((n, j));
                    queue.push_back(to);
                }
            }
        }
        let Some(mut step) = closing else { continue };
        let mut reversed = vec![step];
        while step.0 != start {
            let Some(&prev) = came_from.get(&step.0) else { break };
            reversed.push(prev);
            step = prev;
        }
        reversed.reverse();
        out.push(reversed);
    }
    out
}

/// Tarjan's algorithm, iteratively (a policy may hold thousands of domains).
fn strongly_connected(edges: &[Vec<(usize, usize)>]) -> Vec<Vec<usize>> {
    let n = edges.len();
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut next = 0;
    let mut out = Vec::new();
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        // (node, next edge to look at)
        let mut work = vec![(root, 0usize)];
        index[root] = next;
        low[root] = next;
        next += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(top) = work.last_mut() {
            let (v, e) = *top;
            if let Some(&(w, _)) = edges[v].get(e) {
                top.1 += 1;
                if index[w] == usize::MAX {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut component = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                component.sort_unstable();
                out.push(component);
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::startup::Requires;
    use crate::types::{HostPolicySpec, Metadata, API_VERSION, KIND};

    fn domain(name: &str, order: Option<u32>, after: &[&str]) -> DomainPolicy {
        DomainPolicy {
            startup: Some(Startup {
                order,
                after: after.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..DomainPolicy::named(name)
        }
    }

    fn doc(name: &str, domains: Vec<DomainPolicy>) -> HostPolicy {
        HostPolicy {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata: Metadata { name: name.into(), ..Default::default() },
            spec: HostPolicySpec { domains, ..Default::default() },
        }
    }

    fn messages(issues: &[DependencyIssue]) -> Vec<String> {
        issues.iter().map(|i| format!("{}@{}: {}", i.site.document, i.site.path, i.message)).collect()
    }

    #[test]
    fn a_valid_graph_across_documents_has_no_issue() {
        let docs = [
            doc("a", vec![domain("db1", Some(1), &[]), domain("web1", Some(2), &["db1", "cache1"])]),
            doc("b", vec![domain("cache1", Some(2), &["db1"]), domain("batch", None, &["web1"])]),
        ];
        assert!(check_dependencies(&docs).is_empty(), "{:?}", messages(&check_dependencies(&docs)));
    }

    #[test]
    fn unmanaged_target_is_located_at_its_entry() {
        let docs = [doc("a", vec![domain("web1", None, &["db1", "ghost"])]), doc("b", vec![domain("db1", None, &[])])];
        assert_eq!(
            messages(&check_dependencies(&docs)),
            ["0@spec.domains[0].startup.after[1]: `after` names `ghost`, which no policy manages"]
        );
    }

    #[test]
    fn waiting_for_a_later_order_group_is_rejected() {
        let docs = [doc("a", vec![domain("web1", Some(1), &["db1"]), domain("db1", None, &[])])];
        let m = messages(&check_dependencies(&docs));
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(m[0].starts_with("0@spec.domains[0].startup.after[0]: `web1` can never start after `db1`"), "{m:?}");
        assert!(m[0].contains("(no order, so it starts after all ordered domains) than `web1` (order 1)"), "{m:?}");
    }

    #[test]
    fn a_cycle_across_documents_is_reported_once_with_its_path() {
        let docs = [
            doc("a", vec![domain("web1", Some(2), &["app1"]), domain("db1", Some(2), &["web1"])]),
            doc("b", vec![domain("app1", Some(2), &["db1"]), domain("other", Some(2), &["web1"])]),
        ];
        let issues = check_dependencies(&docs);
        assert_eq!(
            messages(&issues),
            ["0@spec.domains[0].startup.after[0]: dependency cycle: web1 → app1 → db1 → web1 (each waits for the next)"]
        );
        assert_eq!(issues[0].documents, [0, 1]);
    }

    #[test]
    fn two_separate_cycles_are_two_issues() {
        let docs = [doc(
            "a",
            vec![
                domain("a", None, &["b"]),
                domain("b", None, &["a"]),
                domain("c", None, &["d"]),
                domain("d", None, &["c"]),
            ],
        )];
        let m = messages(&check_dependencies(&docs));
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[1].contains("c → d → c"), "{m:?}");
    }

    #[test]
    fn per_domain_checks() {
        let mut d = domain("web1", None, &["web1", "db1", "db1"]);
        if let Some(s) = d.startup.as_mut() {
            s.delay = Some(Duration::from_secs(7200));
            s.requires = Some(Requires { paths: vec!["mnt/images".into(), "/a".into(), "/a".into()] });
        }
        let mut issues = Vec::new();
        validate_startup("spec.domains[0]", &d, &mut issues);
        let got: Vec<String> = issues.iter().map(|i| format!("{}: {}", i.path, i.message)).collect();
        assert_eq!(
            got,
            [
                "spec.domains[0].startup.after[0]: domain `web1` cannot start after itself",
                "spec.domains[0].startup.after[2]: `db1` is listed twice in `after`",
                "spec.domains[0].startup.delay: delay 2h is longer than the maximum 1h",
                "spec.domains[0].startup.requires.paths[0]: required path `mnt/images` is not absolute",
                "spec.domains[0].startup.requires.paths[2]: path `/a` is listed twice",
            ]
        );
    }
}
