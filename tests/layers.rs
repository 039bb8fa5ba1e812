//! The crate is built in layers, lowest first: `routing` (the pure decision core), `gateway`,
//! `front`, `tools`. A layer may use its own layer and those below it, never one above, and the
//! units inside (`layer::module`, a module with all its submodules) must not import each other
//! in a cycle. This test reads the source, follows every `crate::` and `super::` path (use lines,
//! qualified paths, intra-doc links), and fails on an upward reference, a cycle, or a top-level
//! file or folder that belongs to no layer. It prints each unit's import level; point it at
//! another tree with `LAYERS_SRC=/path/to/src` (a tree without layer folders is reported per
//! top-level module and never fails, to compare against the old flat layout).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first.
const LAYERS: &[&str] = &["routing", "gateway", "front", "tools"];

/// One source file: its path under `src/` (with `/` separators) and its text.
struct File {
    rel: String,
    text: String,
}

/// What a scan of one tree found.
#[derive(Default)]
struct Analysis {
    units: BTreeSet<String>,
    /// unit -> unit, with the first place that makes the edge: `src/f.rs:12 (crate::x)`.
    edges: BTreeMap<(String, String), String>,
    /// Upward references: `src/f.rs:12: unit -> target (crate::x)`.
    upward: Vec<String>,
}

/// `gateway/pool/scrape.rs` -> `[gateway, pool, scrape]`; `x/mod.rs` is module `x`.
fn module_path(rel: &str) -> Vec<String> {
    let mut segs: Vec<String> = rel.trim_end_matches(".rs").split('/').map(str::to_owned).collect();
    if segs.len() > 1 && segs.last().is_some_and(|s| s == "mod") {
        segs.pop();
    }
    segs
}

/// The unit an absolute module path falls in; `None` when its top-level module does not exist
/// (`crate::std`, an item re-exported at the crate root).
fn unit_of(segs: &[String], modules: &BTreeSet<String>, layered: bool) -> Option<String> {
    let top = segs.first().filter(|t| modules.contains(*t))?;
    match segs.get(1) {
        // `crate::layer::Item` stays in the layer root unless `Item` is a module file.
        Some(m) if layered && modules.contains(&format!("{top}::{m}")) => Some(format!("{top}::{m}")),
        _ => Some(top.to_owned()),
    }
}

fn rank(unit: &str) -> Option<usize> {
    LAYERS.iter().position(|l| unit.split("::").next() == Some(l))
}

/// `line` without a plain `//` comment. Doc comments are kept whole, since their intra-doc links
/// are references too; `//` inside a string literal (a URL) is not a comment.
fn strip_comment(line: &str) -> &str {
    let t = line.trim_start();
    if (t.starts_with("///") && !t.starts_with("////")) || t.starts_with("//!") {
        return line;
    }
    let b = line.as_bytes();
    let (mut i, mut in_str) = (0, false);
    while i + 1 < b.len() {
        match b[i] {
            b'\\' if in_str => i += 1,
            b'"' => in_str = !in_str,
            // A `'"'` char literal must not open a string.
            b'\'' if !in_str && b[i + 1] == b'"' && b.get(i + 2) == Some(&b'\'') => i += 2,
            b'/' if !in_str && b[i + 1] == b'/' => return &line[..i],
            _ => {}
        }
        i += 1;
    }
    line
}

/// The part of a file the checks read: up to the first `#[cfg(test)]` line (test modules may use
/// anything), without plain comments. Lines keep their numbers.
fn runtime_text(text: &str) -> String {
    text.lines().take_while(|l| l.trim() != "#[cfg(test)]").flat_map(|l| [strip_comment(l), "\n"]).collect()
}

/// Every path in `code` that starts with `crate::` or `super::`, grouped uses expanded into their
/// leaves: (segments including the leading keyword, byte offset of the leaf's start).
fn references(code: &str) -> Vec<(Vec<String>, usize)> {
    let b = code.as_bytes();
    let mut starts: Vec<usize> =
        ["crate::", "super::"].iter().flat_map(|kw| code.match_indices(kw).map(|m| m.0)).collect();
    starts.sort_unstable();
    let (mut out, mut parsed_to) = (Vec::new(), 0);
    for at in starts {
        // Not the tail of a longer name or path (`my_crate::`, `super::super::`), nor a part of
        // a group already parsed (`super::{super::x}`).
        let inside = at > 0 && (b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_' || b[at - 1] == b':');
        if !inside && at >= parsed_to {
            parsed_to = parse_tree(b, at, &mut Vec::new(), &mut out);
        }
    }
    out
}

/// Parses one use-tree starting at `i`, below the segments in `prefix`, and pushes each leaf;
/// returns the index after the tree. Braces may nest; `self`, `*` and `as` are allowed.
fn parse_tree(b: &[u8], mut i: usize, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, usize)>) -> usize {
    let (start, depth) = (i, prefix.len());
    loop {
        let end = i + b[i..].iter().take_while(|c| c.is_ascii_alphanumeric() || **c == b'_').count();
        if end == i {
            break;
        }
        prefix.push(String::from_utf8_lossy(&b[i..end]).into_owned());
        i = end;
        if !b[i..].starts_with(b"::") {
            break;
        }
        i += 2;
    }
    if b.get(i) == Some(&b'{') {
        i += 1;
        loop {
            i += b[i..].iter().take_while(|c| c.is_ascii_whitespace()).count();
            if b.get(i).is_none_or(|c| *c == b'}') {
                break;
            }
            i = parse_tree(b, i, prefix, out);
            // Step over an `as alias` (or anything unparsed) to the separator.
            i += b[i..].iter().take_while(|c| **c != b',' && **c != b'}').count();
            i += usize::from(b.get(i) == Some(&b','));
        }
        i += usize::from(i < b.len()); // the `}`, if the text is not cut short
    } else {
        i += usize::from(b.get(i) == Some(&b'*'));
        out.push((prefix.clone(), start));
    }
    prefix.truncate(depth);
    i
}

/// The absolute module path `segs` names from `module`: `crate::a::b` -> `[a, b]`, and each
/// leading `super` climbs one module; `None` for a path above the crate root.
fn resolve(segs: &[String], module: &[String]) -> Option<Vec<String>> {
    let (mut abs, mut rest) = if segs.first()? == "crate" { (Vec::new(), &segs[1..]) } else { (module.to_vec(), segs) };
    while rest.first().is_some_and(|s| s == "super") {
        abs.pop()?;
        rest = &rest[1..];
    }
    abs.extend(rest.iter().filter(|s| *s != "self").cloned());
    Some(abs)
}

/// The whole of a file without plain comments, test modules included. Lines keep their numbers.
fn all_text(text: &str) -> String {
    text.lines().flat_map(|l| [strip_comment(l), "\n"]).collect()
}

/// Scans `files` (paths relative to `src/`). `layered`: units are `layer::module` and upward
/// references are collected; otherwise each top-level module is a unit. `with_tests`: test
/// modules and test-only files are read too (for cycles: a test that makes two modules depend
/// on each other still ties them together).
fn analyse(files: &[File], layered: bool, with_tests: bool) -> Analysis {
    let mut modules = BTreeSet::new();
    for f in files {
        let segs = module_path(&f.rel);
        for n in 1..=segs.len() {
            modules.insert(segs[..n].join("::"));
        }
    }
    let mut a = Analysis::default();
    // Test-only files are not part of what a layer ships, so they may use anything.
    let is_test_only =
        |f: &&File| f.rel.rsplit('/').next().is_some_and(|n| n == "tests.rs" || n.ends_with("_tests.rs"));
    for f in files.iter().filter(|f| with_tests || !is_test_only(f)) {
        let module = module_path(&f.rel);
        let Some(from) = unit_of(&module, &modules, layered) else { continue };
        a.units.insert(from.clone());
        let code = if with_tests { all_text(&f.text) } else { runtime_text(&f.text) };
        for (segs, at) in references(&code) {
            let Some(abs) = resolve(&segs, &module) else { continue };
            let Some(to) = unit_of(&abs, &modules, layered) else { continue };
            if to == from {
                continue;
            }
            let place = format!("src/{}:{}", f.rel, code[..at].matches('\n').count() + 1);
            let path = format!("crate::{}", abs.join("::"));
            if layered
                && let (Some(x), Some(y)) = (rank(&from), rank(&to))
                && x < y
            {
                a.upward.push(format!("{place}: {from} -> {to} ({path})"));
            }
            a.units.insert(to.clone());
            a.edges.entry((from.clone(), to)).or_insert_with(|| format!("{place} ({path})"));
        }
    }
    a
}

/// Each unit's import level and the cycles (strongly connected components of more than one
/// unit, members sorted). Levels are computed on the condensation, so a cycle shares one level.
fn condense(a: &Analysis) -> (BTreeMap<&str, usize>, Vec<Vec<&str>>) {
    let units: Vec<&str> = a.units.iter().map(String::as_str).collect();
    let n = units.len();
    let id = |u: &str| units.binary_search(&u).expect("edge ends are units");
    let mut adj = vec![Vec::new(); n];
    for (from, to) in a.edges.keys() {
        adj[id(from)].push(id(to));
    }
    // Plain reachability is enough for graphs of a few dozen units, and simpler than Tarjan.
    let reach: Vec<Vec<bool>> = (0..n)
        .map(|u| {
            let (mut seen, mut todo) = (vec![false; n], adj[u].clone());
            while let Some(v) = todo.pop() {
                if !std::mem::replace(&mut seen[v], true) {
                    todo.extend(&adj[v]);
                }
            }
            seen
        })
        .collect();
    // A component is named by its first member: units that reach each other.
    let comp: Vec<usize> =
        (0..n).map(|u| (0..n).find(|&v| v == u || (reach[u][v] && reach[v][u])).expect("u is its own")).collect();
    // Longest path on the acyclic condensation: n relaxation rounds cover every path.
    let mut level = vec![0; n];
    for _ in 0..n {
        for (u, targets) in adj.iter().enumerate() {
            for &w in targets.iter().filter(|&&w| comp[w] != comp[u]) {
                level[comp[u]] = level[comp[u]].max(level[comp[w]] + 1);
            }
        }
    }
    let mut members: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    (0..n).for_each(|u| members.entry(comp[u]).or_default().push(units[u]));
    let levels = (0..n).map(|u| (units[u], level[comp[u]])).collect();
    (levels, members.into_values().filter(|m| m.len() > 1).collect())
}

/// Each cycle's members, then every edge inside it with one place that makes it.
fn cycle_lines(a: &Analysis, cycles: &[Vec<&str>]) -> Vec<String> {
    let mut lines = Vec::new();
    for (k, members) in cycles.iter().enumerate() {
        lines.push(format!("cycle {}: {}", k + 1, members.join(", ")));
        for ((from, to), place) in &a.edges {
            if members.contains(&from.as_str()) && members.contains(&to.as_str()) {
                lines.push(format!("  {from} -> {to}  {place}"));
            }
        }
    }
    lines
}

/// Units, edges, each unit's level (grouped by level) and the cycles, one item per line.
fn summary(a: &Analysis) -> String {
    let (levels, cycles) = condense(a);
    let mut by_level: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for (unit, level) in &levels {
        by_level.entry(*level).or_default().push(unit);
    }
    let mut lines = vec![format!("units: {}, edges: {}, cycles: {}", a.units.len(), a.edges.len(), cycles.len())];
    lines.extend(by_level.iter().map(|(level, units)| format!("level {level}: {}", units.join(", "))));
    lines.extend(cycle_lines(a, &cycles));
    lines.join("\n")
}

/// Every `.rs` file under `src`, except the crate roots `lib.rs` and `main.rs`.
fn load(src: &Path) -> Vec<File> {
    let (mut files, mut dirs) = (Vec::new(), vec![src.to_path_buf()]);
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("source folder is readable") {
            let path = entry.expect("folder entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let rel = path.strip_prefix(src).expect("walked from src").to_string_lossy().replace('\\', "/");
            if path.extension().is_none_or(|x| x != "rs") || rel == "lib.rs" || rel == "main.rs" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("source file is UTF-8");
            files.push(File { rel, text });
        }
    }
    files.sort_by(|x, y| x.rel.cmp(&y.rel));
    files
}

/// Top-level files and folders that are no layer: without this check, new code could bypass
/// the layering by living beside it.
fn stray_entries(src: &Path) -> Vec<String> {
    let mut stray = Vec::new();
    for entry in std::fs::read_dir(src).expect("src/ is readable") {
        let path = entry.expect("folder entry").path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (module, dir) = match name.strip_suffix(".rs") {
            _ if path.is_dir() => (name.as_str(), true),
            Some(stem) if stem != "lib" && stem != "main" => (stem, false),
            _ => continue,
        };
        if !LAYERS.contains(&module) {
            let slash = if dir { "/" } else { "" };
            stray.push(format!("src/{name}{slash}: belongs to no layer ({})", LAYERS.join(", ")));
        }
    }
    stray.sort();
    stray
}

#[test]
fn layers_import_downward_only_and_without_cycles() {
    let (src, explicit) = match std::env::var_os("LAYERS_SRC") {
        Some(p) => (PathBuf::from(p), true),
        None => (Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), false),
    };
    let layered = !explicit || LAYERS.iter().any(|l| src.join(l).is_dir());
    let files = load(&src);
    assert!(!files.is_empty(), "no .rs files under {}", src.display());
    let a = analyse(&files, layered, false);
    let mode = if layered { "units are layer::module" } else { "flat: units are top-level modules" };
    println!("layers of {} ({mode})\n{}", src.display(), summary(&a));
    if !layered {
        return; // comparison mode: report only
    }
    let mut problems = stray_entries(&src);
    problems.extend(a.upward.iter().cloned());
    problems.extend(cycle_lines(&a, &condense(&a).1));
    let with_tests = analyse(&files, layered, true);
    problems
        .extend(cycle_lines(&with_tests, &condense(&with_tests).1).into_iter().map(|l| format!("(tests counted) {l}")));
    assert!(problems.is_empty(), "layering broken:\n{}", problems.join("\n"));
}

/// Units whose imports beyond the core (and their own unit) are named: the config tree is
/// plain data the rest of the gateway converts from; the simulator and the load generator are
/// tools of their own, which borrow only the HTTP accept loop, the task owner and the tokenizer
/// loader (the load generator counts prompts in the simulator's tokenizer, and spawns through
/// the task owner too).
const CONFINED: &[(&str, &[&str])] = &[
    ("gateway::config", &[]),
    ("tools::sim", &["front::listen", "gateway::tasks", "gateway::config"]),
    ("tools::bench", &["tools::sim", "gateway::tasks"]),
];

/// The edges of `a` out of a confined unit to anything but the core, itself or what it names.
fn unconfined(a: &Analysis) -> Vec<String> {
    let mut out = Vec::new();
    for ((from, to), place) in &a.edges {
        let Some((_, allowed)) = CONFINED.iter().find(|(u, _)| u == from) else { continue };
        if rank(to) != Some(0) && to != from && !allowed.contains(&to.as_str()) {
            out.push(format!("{from} -> {to} at {place}"));
        }
    }
    out
}

#[test]
fn confined_units_import_only_what_they_name() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = unconfined(&analyse(&load(&src), true, false));
    assert!(found.is_empty(), "imports beyond what ARCHITECTURE.md names:\n{}", found.join("\n"));
}

#[test]
fn the_confinement_check_catches_a_config_import() {
    let a = scan(&[
        ("gateway/config.rs", "use crate::gateway::paths::PathsConfig;\n"),
        ("gateway/paths.rs", "pub struct PathsConfig;\n"),
        ("routing.rs", ""),
        ("gateway.rs", "pub mod config; pub mod paths;\n"),
    ]);
    assert_eq!(unconfined(&a).len(), 1, "{:?}", a.edges);
}

/// A layered scan of an inline tree of (path under `src/`, text).
fn scan(tree: &[(&str, &str)]) -> Analysis {
    let files: Vec<File> =
        tree.iter().map(|(rel, text)| File { rel: (*rel).to_owned(), text: (*text).to_owned() }).collect();
    analyse(&files, true, false)
}

#[test]
fn the_scanner_catches_an_upward_use() {
    let a = scan(&[("gateway/pool.rs", "use crate::front::proxy::X;\n"), ("front/proxy.rs", "")]);
    assert_eq!(a.upward, ["src/gateway/pool.rs:1: gateway::pool -> front::proxy (crate::front::proxy::X)"]);
}

#[test]
fn the_scanner_expands_grouped_uses() {
    let text = "//! Pool.\nuse crate::{routing::request, front::{proxy::{self, X as Y},\n    Z}};\n";
    let a = scan(&[("gateway/pool.rs", text), ("front/proxy.rs", ""), ("routing/request.rs", "")]);
    assert_eq!(
        a.upward,
        [
            "src/gateway/pool.rs:2: gateway::pool -> front::proxy (crate::front::proxy)",
            "src/gateway/pool.rs:2: gateway::pool -> front::proxy (crate::front::proxy::X)",
            "src/gateway/pool.rs:3: gateway::pool -> front (crate::front::Z)",
        ]
    );
    assert!(a.edges.contains_key(&("gateway::pool".to_owned(), "routing::request".to_owned())));
    // A group cut short (a doc example, a half-typed line) must not break the scan.
    assert_eq!(references("crate::{a::{b").len(), 1);
}

#[test]
fn the_scanner_reads_intra_doc_links() {
    let a = scan(&[("gateway.rs", "//! Called by [`crate::front::proxy`].\n"), ("front/proxy.rs", "")]);
    assert_eq!(a.upward, ["src/gateway.rs:1: gateway -> front::proxy (crate::front::proxy)"]);
}

#[test]
fn the_scanner_skips_plain_comments_and_test_code() {
    let text = "// use crate::front::proxy::X;\nlet u = \"http://x\"; // crate::front\n\
                #[cfg(test)]\nuse crate::front::proxy::X;\n";
    let a =
        scan(&[("gateway/pool.rs", text), ("gateway/pool_tests.rs", "use crate::front::X;"), ("front/proxy.rs", "")]);
    assert!(a.upward.is_empty() && a.edges.is_empty(), "{:?}", a.upward);
}

#[test]
fn the_scanner_finds_a_two_cycle() {
    let a = scan(&[
        ("gateway/a.rs", "use crate::gateway::b::X;\n"),
        ("gateway/b.rs", "fn f() {}\nuse crate::gateway::a::Y;\n"),
    ]);
    let (levels, cycles) = condense(&a);
    assert_eq!(levels["gateway::a"], levels["gateway::b"]);
    assert_eq!(
        cycle_lines(&a, &cycles),
        [
            "cycle 1: gateway::a, gateway::b",
            "  gateway::a -> gateway::b  src/gateway/a.rs:1 (crate::gateway::b::X)",
            "  gateway::b -> gateway::a  src/gateway/b.rs:2 (crate::gateway::a::Y)",
        ]
    );
}

#[test]
fn the_scanner_resolves_super() {
    let tree = [
        // `super` stays in the unit; `super::super` reaches a sibling unit.
        ("gateway/pool/scrape.rs", "use super::Pool;\nuse super::super::config::C;\n"),
        // `super` is the layer `gateway`, `super::super` the crate root; nested in a group too.
        ("gateway/pool.rs", "use super::{config, super::front::X};\n"),
        ("gateway/config.rs", ""),
        // A layer root file's `super` is the crate root.
        ("front.rs", "use super::routing::R;\n"),
        ("routing.rs", ""),
    ];
    let a = scan(&tree);
    let edges: Vec<_> = a.edges.keys().map(|(f, t)| format!("{f} -> {t}")).collect();
    assert_eq!(edges, ["front -> routing", "gateway::pool -> front", "gateway::pool -> gateway::config"]);
    assert_eq!(a.upward, ["src/gateway/pool.rs:1: gateway::pool -> front (crate::front::X)"]);
}

#[test]
fn a_cycle_made_by_test_code_counts_when_tests_are_read() {
    let tree = [
        ("routing/prefix.rs", "//! See [`crate::routing::request`].\n"),
        ("routing/request.rs", "fn f() {}\n#[cfg(test)]\nmod tests;\n"),
        ("routing/request/tests.rs", "use crate::routing::prefix::hash_prompt;\n"),
    ];
    let files: Vec<File> =
        tree.iter().map(|(rel, text)| File { rel: (*rel).to_owned(), text: (*text).to_owned() }).collect();
    assert!(condense(&analyse(&files, true, false)).1.is_empty(), "runtime code alone has no cycle");
    let with_tests = analyse(&files, true, true);
    assert_eq!(condense(&with_tests).1, [vec!["routing::prefix", "routing::request"]]);
}
