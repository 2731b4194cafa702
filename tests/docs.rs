//! The documentation stays true to the code.
//!
//! - Every config field the daemon accepts is described in `docs/configuration.md` and shown in
//!   `deploy/config.example.yaml`. The field list is derived from the config types themselves,
//!   not from a list kept by hand: see [`config_fields`].
//! - Every metric family the running daemon exposes on `/metrics` (and every family its registry
//!   declares, including those with no series yet), and every family of the key service's
//!   `/metrics`, is described in `docs/operations.md`, and no page names a `gybc_authz_*` metric
//!   that does not exist.
//! - Every relative link in README.md, ARCHITECTURE.md and docs/*.md points to a file that exists
//!   (and to a heading that exists, for links with an anchor into a Markdown page); every docs/
//!   page is linked from the README, and the README stays a front page (at most 250 lines).
//! - Every repository path ARCHITECTURE.md names exists, and every source file of the daemon,
//!   the engine and the Envoy module is on its code map.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use gybc_authz_engine::config::Config;
use serde_yaml_ng::{Mapping, Value};
use support::*;

const README_MAX_LINES: usize = 250;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

// === (a) config fields ===

/// A field name no config struct has: deserializing it makes serde name the fields it expected.
const PROBE: &str = "__probe__";

/// One step from the config's root to a place in it.
#[derive(Clone)]
enum Step {
    Field(String),
    /// An element of a list.
    Item,
    /// The variant of an internally tagged enum (`type: file`): the tag goes into the same map.
    Variant {
        tag: String,
        name: String,
    },
}

/// The YAML value that reaches `leaf` by `steps`, with nothing else set.
fn nest(steps: &[Step], leaf: Value) -> Value {
    match steps.split_first() {
        None => leaf,
        Some((Step::Field(f), rest)) => {
            let mut m = Mapping::new();
            m.insert(Value::String(f.clone()), nest(rest, leaf));
            Value::Mapping(m)
        }
        Some((Step::Item, rest)) => Value::Sequence(vec![nest(rest, leaf)]),
        Some((Step::Variant { tag, name }, rest)) => {
            let mut m = match nest(rest, leaf) {
                Value::Mapping(m) => m,
                other => panic!("a variant holds a map, not {other:?}"),
            };
            m.insert(Value::String(tag.clone()), Value::String(name.clone()));
            Value::Mapping(m)
        }
    }
}

fn probe_map() -> Value {
    let mut m = Mapping::new();
    m.insert(Value::String(PROBE.into()), Value::Number(1.into()));
    Value::Mapping(m)
}

/// What serde says about this config value ("" when it deserializes).
fn complaint(value: Value) -> String {
    match serde_yaml_ng::from_value::<Config>(value) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

/// The backticked names after `after` in a serde message: `expected one of `a`, `b``.
fn names_after(msg: &str, after: &str) -> Option<Vec<String>> {
    let rest = &msg[msg.find(after)? + after.len()..];
    let rest = &rest[rest.find("expected")?..];
    Some(
        rest.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect(),
    )
}

/// Every config field, as a path (`server.grpc_addr`, `jwt.providers[].keys.url`,
/// `key_store.type`), found by asking the config's own `Deserialize` impls.
///
/// `Config` implements only `Deserialize`, so it cannot be serialized to list its fields, and
/// parsing the struct definitions would miss renames, `skip`s and tagged enums. Instead every
/// config struct has `#[serde(deny_unknown_fields)]` (docs/style.md, rule 7), so feeding a map
/// with an unknown key makes serde answer with the exact names it accepts there, and the same
/// trick on `type:` lists an internally tagged enum's variants. Walking that from the root finds
/// every field the parser accepts, with the names a config file uses, and nothing it skips (the
/// Redis password read from a file is not a field). A place that accepts a map but names no
/// fields (a struct without `deny_unknown_fields`) fails the walk rather than hiding fields.
fn config_fields() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    walk_struct(&[], "", &mut out);
    out
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// `steps` lead to a struct: every field of it.
fn walk_struct(steps: &[Step], path: &str, out: &mut BTreeSet<String>) {
    let msg = complaint(nest(steps, probe_map()));
    let fields = names_after(&msg, &format!("unknown field `{PROBE}`"))
        .unwrap_or_else(|| panic!("`{path}` should list its fields, serde said: {msg}"));
    for field in fields {
        let mut at = steps.to_vec();
        at.push(Step::Field(field.clone()));
        walk_value(&at, &join(path, &field), out);
    }
}

/// `steps` lead to a field: a struct (walked), a tagged enum (its tag and each variant's
/// fields), a list of structs (walked as `field[]`), or a leaf.
fn walk_value(steps: &[Step], path: &str, out: &mut BTreeSet<String>) {
    let msg = complaint(nest(steps, probe_map()));
    if msg.contains(&format!("unknown field `{PROBE}`")) {
        return walk_struct(steps, path, out);
    }
    if let Some(tag) = msg
        .split_once("missing field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(tag, _)| tag.to_owned())
    {
        // An internally tagged enum: the tag is a field, and so is each variant's content.
        out.insert(join(path, &tag));
        let mut with_tag = Mapping::new();
        with_tag.insert(Value::String(tag.clone()), Value::String(PROBE.into()));
        let msg = complaint(nest(steps, Value::Mapping(with_tag)));
        let variants =
            names_after(&msg, &format!("unknown variant `{PROBE}`")).unwrap_or_else(|| {
                panic!("`{path}.{tag}` should list its variants, serde said: {msg}")
            });
        for name in variants {
            let mut at = steps.to_vec();
            at.push(Step::Variant {
                tag: tag.clone(),
                name,
            });
            // A unit variant (`type: none`) has no fields: serde accepts or refuses the probe
            // without naming any.
            let msg = complaint(nest(&at, probe_map()));
            if msg.contains(&format!("unknown field `{PROBE}`")) {
                walk_struct(&at, path, out);
            }
        }
        return;
    }
    if msg.contains("expected a sequence") {
        let mut item = steps.to_vec();
        item.push(Step::Item);
        let msg = complaint(nest(&item, probe_map()));
        if msg.contains(&format!("unknown field `{PROBE}`")) {
            return walk_struct(&item, &format!("{path}[]"), out);
        }
    }
    out.insert(path.to_owned());
}

/// The key paths of a YAML file with its commented-out examples included: `# redis:` and
/// `#   urls: [...]` count as `redis` and `redis.urls`. A line is a key when, after its
/// indentation and at most one `#`, it starts with a snake_case name and a colon (prose in
/// comments starts with a capital, a backtick or a brace, and is skipped). List items add `[]`.
fn example_keys(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    // (indent, name) of the keys enclosing the current line; "[]" marks a list item.
    let mut stack: Vec<(usize, String)> = Vec::new();
    for raw in text.lines() {
        let indent = raw.len() - raw.trim_start().len();
        let rest = &raw[indent..];
        let line = match rest.strip_prefix('#') {
            Some(c) => format!("{}{}", " ".repeat(indent), c.strip_prefix(' ').unwrap_or(c)),
            None => raw.to_owned(),
        };
        let mut indent = line.len() - line.trim_start().len();
        let mut body = line.trim_start();
        let item = body.starts_with("- ");
        if item {
            body = body[2..].trim_start();
        }
        let Some((name, _)) = body.split_once(':') else {
            continue;
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            continue;
        }
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        if item {
            stack.push((indent, "[]".into()));
            indent += 2;
        }
        let mut path = String::new();
        for (_, n) in &stack {
            if n == "[]" {
                path.push_str("[]");
            } else {
                path = join(&path, n);
            }
        }
        let path = join(&path, name);
        out.insert(path);
        stack.push((indent, name.to_owned()));
    }
    out
}

#[test]
fn every_config_field_is_documented_and_in_the_example() {
    let fields = config_fields();
    // The walk itself works: these exist at every depth and kind it handles.
    for known in [
        "server.grpc_addr",
        "server.http_authz.uri_header",
        "jwt.providers[].keys.type",
        "jwt.providers[].keys.url",
        "key_store.reload_interval_ms",
        "redis.breaker.failures",
        "policy.tenantless_paths",
    ] {
        assert!(
            fields.contains(known),
            "field walk missed {known}: {fields:?}"
        );
    }
    assert!(
        !fields.iter().any(|f| f.ends_with(".password")),
        "a skipped field is not a config field: {fields:?}"
    );

    let page = read("docs/configuration.md");
    let missing: Vec<_> = fields
        .iter()
        .filter(|f| !page.contains(&format!("`{f}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not describe these config fields (write each as `path`): {missing:?}"
    );
    // And the page describes no field that is gone: its tables' first cells are real fields.
    for line in page.lines() {
        let Some(cell) = line.strip_prefix("| `") else {
            continue;
        };
        let Some((name, _)) = cell.split_once("` |") else {
            continue;
        };
        if name.contains('.') && !name.contains(' ') {
            assert!(
                fields.contains(name),
                "docs/configuration.md describes `{name}`, which the config does not have"
            );
        }
    }

    let example = example_keys(&read("deploy/config.example.yaml"));
    let missing: Vec<_> = fields.iter().filter(|f| !example.contains(*f)).collect();
    assert!(
        missing.is_empty(),
        "deploy/config.example.yaml does not show these fields (add them, commented out if they \
         are optional sections): {missing:?}"
    );
}

// === (b) metrics ===

/// `gybc_authz_*` names written in `text` as metric names: not part of a longer word (so not
/// `envoy_gybc_authz_*`, Envoy's copies of them), and not the crates' own names.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    const NOT_METRICS: [&str; 2] = ["gybc_authz_engine", "gybc_authz_envoy"];
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(pos) = text[i..].find("gybc_authz_") {
        let start = i + pos;
        let mut end = start + "gybc_authz_".len();
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        i = end;
        if start > 0 && word(bytes[start - 1]) {
            continue;
        }
        let name = &text[start..end];
        if name.len() > "gybc_authz_".len() && !NOT_METRICS.contains(&name) {
            out.insert(name.to_owned());
        }
    }
    out
}

#[tokio::test]
async fn every_metric_family_is_documented_and_no_page_names_a_missing_one() {
    let env = TestEnv::start().await;
    let scraped = scrape(&env).await.names();
    env.stop().await;
    assert!(
        scraped.contains("gybc_authz_decisions_total"),
        "scrape works: {scraped:?}"
    );
    // Families without a series yet are not on the page (e.g. route config errors before the
    // first one); the registry lists them all.
    let declared: BTreeSet<String> = gybc_authz_engine::metrics::Metrics::new()
        .families()
        .iter()
        .map(|f| f.name.clone())
        .collect();
    // The key service's, a process with a registry of its own.
    let key_service = support::key_service::families();
    assert!(
        key_service.contains("gybc_authz_key_service_requests_total"),
        "{key_service:?}"
    );
    let families: BTreeSet<String> = scraped
        .union(&declared)
        .chain(&key_service)
        .cloned()
        .collect();

    let ops = read("docs/operations.md");
    let missing: Vec<_> = families
        .iter()
        .filter(|f| !ops.contains(&format!("`{f}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not describe these metric families: {missing:?}"
    );

    let series = |name: &str| {
        families.contains(name)
            || ["_bucket", "_count", "_sum"]
                .iter()
                .any(|s| name.strip_suffix(s).is_some_and(|f| families.contains(f)))
    };
    for page in doc_pages() {
        // Prose and code spans, not code blocks: those hold Envoy configs whose cluster names
        // (`gybc_authz_http`) are not metrics.
        for name in metric_names_in(&prose(&read(&page)).join("\n")) {
            assert!(
                series(&name),
                "{page} names the metric {name}, which /metrics does not have"
            );
        }
    }
}

// === (c) links ===

/// README.md, ARCHITECTURE.md and every docs/*.md, relative to the root.
fn doc_pages() -> Vec<String> {
    let mut pages = vec!["README.md".to_owned(), "ARCHITECTURE.md".to_owned()];
    let mut docs: Vec<String> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The lines of a Markdown page outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|l| {
            if l.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

/// Link targets in a Markdown page: `[text](target)`, outside code blocks and code spans.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose(text) {
        // Code spans hold examples, not links.
        let line: String = line
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, s)| s)
            .collect::<Vec<_>>()
            .join("``");
        let mut rest = line.as_str();
        while let Some(pos) = rest.find("](") {
            rest = &rest[pos + 2..];
            if let Some(end) = rest.find(')') {
                out.push(rest[..end].trim().to_owned());
                rest = &rest[end..];
            }
        }
    }
    out
}

/// GitHub's anchors for the headings of a Markdown page: lower case, punctuation dropped,
/// spaces to `-`, repeats numbered `-1`, `-2`.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in prose(text) {
        let Some(title) = line.strip_prefix('#') else {
            continue;
        };
        let title = title.trim_start_matches('#');
        if !title.starts_with(' ') {
            continue;
        }
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let n = seen.entry(slug.clone()).or_default();
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

#[test]
fn every_relative_link_resolves_and_the_readme_is_a_front_page() {
    let mut checked = 0;
    for page in doc_pages() {
        let text = read(&page);
        let dir = Path::new(&page).parent().unwrap_or(Path::new(""));
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let file_rel: PathBuf = if file.is_empty() {
                PathBuf::from(&page)
            } else {
                dir.join(file)
            };
            let on_disk = root().join(&file_rel);
            assert!(
                on_disk.exists(),
                "{page}: link `{target}` points to {}, which does not exist",
                file_rel.display()
            );
            if !anchor.is_empty() && file_rel.extension().is_some_and(|e| e == "md") {
                let headings = anchors(&std::fs::read_to_string(&on_disk).unwrap());
                assert!(
                    headings.contains(anchor),
                    "{page}: link `{target}`: {} has no heading with anchor #{anchor}",
                    file_rel.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 30, "links were found and checked ({checked})");

    let readme = read("README.md");
    let lines = readme.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md is {lines} lines; keep it a front page (≤ {README_MAX_LINES}) and move reference text to docs/"
    );
    // Every reference page is reachable from the front page.
    let linked: BTreeSet<String> = links(&readme)
        .into_iter()
        .map(|t| t.split('#').next().unwrap_or_default().to_owned())
        .collect();
    for page in doc_pages().into_iter().filter(|p| p.starts_with("docs/")) {
        assert!(linked.contains(&page), "README.md does not link {page}");
    }
    assert!(
        linked.contains("ARCHITECTURE.md"),
        "README.md links ARCHITECTURE.md"
    );
}

// === (d) ARCHITECTURE.md and the tree ===

/// Code spans in ARCHITECTURE.md's prose (not its diagrams) that are repository paths: written from the root, made of path
/// characters, with a `/` or a known file extension (so `x-api-key`, `/readyz` and `gybc.*` are
/// not paths, and `crates/engine/src/store/` is).
fn architecture_paths(text: &str) -> BTreeSet<String> {
    const EXTENSIONS: [&str; 9] = [
        ".rs", ".md", ".toml", ".yaml", ".json", ".proto", ".sh", ".py", ".conf",
    ];
    prose(text)
        .into_iter()
        .flat_map(|line| line.split('`').skip(1).step_by(2))
        .filter(|s| {
            !s.is_empty()
                && !s.starts_with('/')
                && !s.contains("://")
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-/".contains(&b))
                && (s.contains('/') || EXTENSIONS.iter().any(|e| s.ends_with(e)))
        })
        .map(str::to_owned)
        .collect()
}

/// Every `.rs` file under `dir`, relative to the root.
fn rust_files(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(root().join(dir)).unwrap() {
        let path = dir.join(entry.unwrap().file_name());
        if root().join(&path).is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path.to_string_lossy().into_owned());
        }
    }
}

#[test]
fn architecture_names_only_paths_that_exist_and_maps_every_source_file() {
    let text = read("ARCHITECTURE.md");
    let paths = architecture_paths(&text);
    assert!(paths.len() > 30, "paths were found: {paths:?}");
    let gone: Vec<_> = paths
        .iter()
        .filter(|p| !root().join(p.as_str()).exists())
        .collect();
    assert!(
        gone.is_empty(),
        "ARCHITECTURE.md names paths that do not exist (write them from the repository root): {gone:?}"
    );

    // The code map is complete: each source file is named, or its folder is.
    let mut sources = Vec::new();
    for dir in ["src", "crates/engine/src", "crates/envoy-module/src"] {
        rust_files(Path::new(dir), &mut sources);
    }
    let unmapped: Vec<_> = sources
        .iter()
        // Unit-test suites beside their module (`config/tests.rs`) belong to that module.
        .filter(|f| !f.ends_with("/tests.rs"))
        .filter(|f| {
            !paths
                .iter()
                .any(|p| p == *f || (p.ends_with('/') && f.starts_with(p.as_str())))
        })
        .collect();
    assert!(
        unmapped.is_empty(),
        "ARCHITECTURE.md's code map does not name these source files (or their folder): {unmapped:?}"
    );
}
