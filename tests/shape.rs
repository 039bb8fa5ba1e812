//! Files and functions stay small enough to read. Every `.rs` file under `src/` has at most
//! 600 lines unless its module doc (the `//!` lines it opens with) carries a line
//! `//! Over 600 lines: <reason>`, and no function is longer than 120 lines (from its `fn` line
//! to its closing brace; closures and nested functions count within the function around them).
//! The scan blanks comments, strings and char literals, then matches braces from each `fn`.

use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 120;
/// The start of the line that lets a file be longer, followed by its reason.
const MARKER: &str = "//! Over 600 lines:";

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).expect("src/ is readable");
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
}

/// Whether a file's module doc gives a reason to be long.
fn has_reason(text: &str) -> bool {
    text.lines()
        .take_while(|l| l.trim_start().starts_with("//!"))
        .any(|l| l.trim_start().strip_prefix(MARKER).is_some_and(|r| !r.trim().is_empty()))
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `text` with comments, string literals and char literals replaced by spaces; newlines stay,
/// so line numbers do too. Lifetimes and labels (`'a`) are kept.
fn code_only(text: &str) -> Vec<char> {
    let s: Vec<char> = text.chars().collect();
    let mut out = s.clone();
    let blank = |out: &mut Vec<char>, from: usize, to: usize| {
        for c in &mut out[from..to.min(s.len())] {
            if *c != '\n' {
                *c = ' ';
            }
        }
    };
    let mut i = 0;
    while i < s.len() {
        let prev_ident = i > 0 && is_ident(s[i - 1]);
        let next = s.get(i + 1).copied();
        let start = i;
        if s[i] == '/' && next == Some('/') {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if s[i] == '/' && next == Some('*') {
            let mut depth = 0;
            while i < s.len() {
                if s[i] == '/' && s.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && s.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if s[i] == 'r' && matches!(next, Some('"' | '#')) && (!prev_ident || raw_prefix(&s, i)) {
            // A raw string `r#"…"#`; `r#ident` (a raw identifier) has no quote after its hashes.
            let mut j = i + 1;
            while s.get(j) == Some(&'#') {
                j += 1;
            }
            if s.get(j) != Some(&'"') {
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            i = j + 1;
            while i < s.len() && !(s[i] == '"' && (1..=hashes).all(|k| s.get(i + k) == Some(&'#'))) {
                i += 1;
            }
            i += 1 + hashes;
        } else if s[i] == '"' {
            i += 1;
            while i < s.len() && s[i] != '"' {
                i += if s[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if s[i] == '\'' && next == Some('\\') {
            i += 2;
            while i < s.len() && s[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if s[i] == '\'' && s.get(i + 2) == Some(&'\'') {
            i += 3;
        } else {
            i += 1;
            continue;
        }
        blank(&mut out, start, i);
    }
    out
}

/// Whether the `r` at `i` follows a lone `b` (a raw byte string `br"…"`).
fn raw_prefix(s: &[char], i: usize) -> bool {
    i > 0 && s[i - 1] == 'b' && (i < 2 || !is_ident(s[i - 2]))
}

/// Every function with a body: (name, first line, number of lines), lines counted from 1.
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let code = code_only(text);
    let line_at = |i: usize| 1 + code[..i].iter().filter(|&&c| c == '\n').count();
    let mut found = Vec::new();
    let mut i = 0;
    while i + 2 < code.len() {
        let at_fn = code[i] == 'f'
            && code[i + 1] == 'n'
            && !is_ident(code[i + 2])
            && (i == 0 || !is_ident(code[i - 1]) && code[i - 1] != '$');
        if !at_fn {
            i += 1;
            continue;
        }
        // The name; `fn(…)` is a function pointer type, not an item.
        let mut j = i + 2;
        while j < code.len() && code[j].is_whitespace() {
            j += 1;
        }
        let name_start = j;
        while j < code.len() && (is_ident(code[j]) || code[j] == '$') {
            j += 1;
        }
        let name: String = code[name_start..j].iter().collect();
        if name.is_empty() {
            i = j;
            continue;
        }
        // The body's `{`, or the `;` of a declaration without one (`[u8; 4]` is not it).
        let mut depth = 0i32;
        while j < code.len() {
            match code[j] {
                '(' | '[' => depth += 1,
                ')' | ']' => depth -= 1,
                '{' | ';' if depth == 0 => break,
                _ => {}
            }
            j += 1;
        }
        if code.get(j) == Some(&'{') {
            let open = j;
            let mut braces = 0i32;
            while j < code.len() {
                match code[j] {
                    '{' => braces += 1,
                    '}' => braces -= 1,
                    _ => {}
                }
                if braces == 0 {
                    break;
                }
                j += 1;
            }
            let first = line_at(i);
            found.push((name, first, line_at(j.min(code.len() - 1)) - first + 1));
            // Nested functions are found too, each measured on its own.
            i = open;
        }
        i += 1;
    }
    found
}

/// What breaks the rule in one file, as report lines.
fn offences(rel: &str, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lines = text.lines().count();
    if lines > MAX_FILE_LINES && !has_reason(text) {
        out.push(format!("{rel}: {lines} lines and no `{MARKER} <reason>` line in its module doc"));
    }
    for (name, line, len) in functions(text) {
        if len > MAX_FN_LINES {
            out.push(format!("{rel}:{line}: fn {name} is {len} lines (at most {MAX_FN_LINES})"));
        }
    }
    out
}

#[test]
fn files_and_functions_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "found the source tree ({} files)", files.len());
    let mut all = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).expect("source files are UTF-8");
        let rel = path.strip_prefix(&src).expect("under src/").display().to_string();
        all.extend(offences(&format!("src/{rel}"), &text));
    }
    assert!(all.is_empty(), "files or functions too long:\n{}", all.join("\n"));
}

/// A function of `n` lines whose body holds `inner` on its middle line.
fn function(n: usize, inner: &str) -> String {
    let mut f = String::from("fn long() {\n");
    for k in 0..n - 2 {
        f.push_str(if k == n / 2 { inner } else { "    let x = 1;" });
        f.push('\n');
    }
    f.push_str("}\n");
    f
}

fn check(text: &str, expected: &[(&str, usize, usize)]) {
    let got = functions(text);
    let expected: Vec<(String, usize, usize)> = expected.iter().map(|&(n, l, len)| (n.to_owned(), l, len)).collect();
    assert_eq!(got, expected, "in:\n{text}");
}

#[test]
fn the_scan_measures_functions() {
    check("fn a() {}\nfn b() -> u8 {\n    1\n}\n", &[("a", 1, 1), ("b", 2, 3)]);
    // Declarations without a body, function pointer types and array types in signatures.
    check("trait T { fn a(&self); }\nstruct S { f: fn(u8) -> u8 }\n", &[]);
    check("fn a(x: [u8; 4]) {\n}\n", &[("a", 1, 2)]);
    // Braces in strings, raw strings, chars, comments; lifetimes are not chars.
    check("fn a<'x>(s: &'x str) {\n    \"}\"; '}'; r#\"}\"#; b'{';\n    // }\n    /* } */\n}\n", &[("a", 1, 5)]);
    check("fn a() { let s = \"\\\"}\"; let c = '\\''; }\nfn b() {}\n", &[("a", 1, 1), ("b", 2, 1)]);
    // Nested functions and closures count within the outer one, and are measured too.
    check("fn a() {\n    fn b() {\n    }\n    let c = || {\n    };\n}\n", &[("a", 1, 6), ("b", 2, 2)]);
    // `fn` inside a word or a string is not a function.
    check("let defn = \"fn x() {}\"; fn_x();\n", &[]);
}

#[test]
fn the_rule_reports_long_files_and_functions() {
    assert!(offences("f.rs", &function(MAX_FN_LINES, "")).is_empty());
    let long = offences("f.rs", &function(MAX_FN_LINES + 1, "    let s = \"}\";"));
    assert_eq!(long, [format!("f.rs:1: fn long is {} lines (at most 120)", MAX_FN_LINES + 1)]);
    let many = "fn f() {}\n".repeat(MAX_FILE_LINES + 1);
    assert_eq!(offences("f.rs", &many).len(), 1);
    let doc = format!("//! What it is.\n{MARKER} one table\n{many}");
    assert!(offences("f.rs", &doc).is_empty());
    let late = format!("//! What it is.\n\n{MARKER} one table\n{many}");
    assert_eq!(offences("f.rs", &late).len(), 1, "the reason must be in the module doc");
    let empty = format!("{MARKER}\n{many}");
    assert_eq!(offences("f.rs", &empty).len(), 1, "a reason must be given");
}
