//! The README says what the code does: its scheduler plugin table lists every plugin type the
//! config accepts, under its kind, and its `/debug/explain` example is answered by the demo it
//! is written against.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};

use kvgate::routing::schedule::config::PLUGIN_TYPES;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

/// The plugin table's rows: its kind column and the backticked names in its types column.
fn plugin_table(readme: &str) -> Vec<(String, Vec<String>)> {
    let table = readme.split("**Scheduler plugins.**").nth(1).expect("a plugin table");
    table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // the header and its rule
        .map(|row| {
            let mut cells = row.trim_matches('|').split('|').map(str::trim);
            let kind = cells.next().unwrap_or_default().to_owned();
            let types = cells.next().unwrap_or_default();
            let names = types.split('`').skip(1).step_by(2).map(str::to_owned).collect();
            (kind, names)
        })
        .collect()
}

#[test]
fn the_plugin_table_lists_every_plugin_type_under_its_kind() {
    let rows = plugin_table(&readme());
    let row_of = |category: &str| match category {
        "filter" => "filters",
        "scorer" => "scorers",
        "picker" => "pickers",
        "profile handler" => "profile handlers",
        _ => "other",
    };
    for (kind, category) in PLUGIN_TYPES {
        let row = rows.iter().find(|(k, _)| k == row_of(category));
        let (_, names) = row.unwrap_or_else(|| panic!("no `{}` row in {rows:?}", row_of(category)));
        assert!(names.iter().any(|n| n == kind), "`{kind}` is not in the README's `{}` row", row_of(category));
    }
    // And the table names no plugin the config would refuse.
    let plugin_suffixes = ["-filter", "-scorer", "-picker", "-handler", "-producer", "-decider"];
    for name in rows.iter().flat_map(|(_, names)| names) {
        if plugin_suffixes.iter().any(|s| name.ends_with(s)) {
            assert!(PLUGIN_TYPES.iter().any(|(t, _)| t == name), "the README lists `{name}`, which is no plugin type");
        }
    }
}

/// `kvgate serve` with no config (the demo), stopped when dropped.
struct Demo {
    child: Child,
    admin: String,
}

impl Demo {
    /// Starts the demo on free ports and reads its admin address from the banner.
    fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .args(["serve", "--proxy-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kvgate serve starts");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut banner = String::new();
        let admin = loop {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.kill();
                panic!("no admin line in the banner:\n{banner}");
            }
            banner.push_str(&line);
            if let Some(rest) = line.trim().strip_prefix("admin") {
                let url = rest.trim().strip_prefix("http://").expect("an admin URL");
                break url.split('/').next().expect("host:port").to_owned();
            }
        };
        Self { child, admin }
    }

    /// Sends one HTTP/1.1 request to the admin listener; the status and body.
    fn request(&self, method: &str, target: &str, body: &str) -> (u16, String) {
        let mut conn = std::net::TcpStream::connect(&self.admin).expect("connect");
        write!(
            conn,
            "{method} {target} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut answer = String::new();
        conn.read_to_string(&mut answer).expect("read");
        let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        (status, body)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The README's `curl … /debug/explain?… -d '…'` example: its path and query, and its body.
fn explain_example(readme: &str) -> (String, String) {
    let mut lines = readme.lines().skip_while(|l| !l.contains("/debug/explain?"));
    let url = lines.next().expect("an explain example");
    let target = url.split('\'').nth(1).expect("a quoted URL");
    let target = &target[target.find('/').expect("a path")..];
    let data = lines.next().expect("the example's body line");
    let body = data.trim().strip_prefix("-d '").and_then(|b| b.strip_suffix('\'')).expect("-d '…'");
    (target.to_owned(), body.to_owned())
}

#[test]
fn the_explain_example_is_answered_by_the_demo() {
    let (target, body) = explain_example(&readme());
    let demo = Demo::start();
    // Ready once its pool has its endpoints.
    let mut ready = false;
    for _ in 0..100 {
        if demo.request("GET", "/readyz", "").0 == 200 {
            ready = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(ready, "the demo never became ready");
    let (status, answer) = demo.request("POST", &target, &body);
    assert_eq!(status, 200, "{target} {body}: {answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(answer["pool"], "demo", "{answer}");
    assert!(!answer["decision"].is_null(), "{answer}");
}
