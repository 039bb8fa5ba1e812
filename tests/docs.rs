//! The README and the manual in docs/ say what the code does, and their commands work.
//!
//! Every fenced `sh` block of README.md and docs/*.md is run, page by page, by the rules in
//! docs/README.md ("Commands in these pages"): `kvgate serve` and `kvgate sim` stay up in the
//! background until the page ends, the page's fixed loopback ports are moved to free ones, and
//! every other command must exit 0 within its time limit. A block whose commands need what a
//! test cannot have names, in an HTML comment just above it, the files that run them; those
//! files must contain the commands. Besides, the scheduler plugin table of docs/scheduling.md
//! lists every plugin type the config accepts, and the `/debug/explain` example of
//! docs/operations.md is answered with a decision by the demo.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvgate::routing::schedule::config::PLUGIN_TYPES;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The info string of runnable blocks.
const RUNNABLE: &str = "sh";
/// This file, as a marker names it.
const THIS: &str = "tests/docs.rs";
/// The ports `kvgate serve` listens on by default (proxy, ext_proc, admin).
const DEMO_PORTS: [u16; 3] = [8080, 9002, 9090];
/// How long a server may take to answer after it starts.
const STARTUP: Duration = Duration::from_secs(60);

/// One fenced block: where it starts, its info string, the files its marker names, its commands.
#[derive(Debug)]
struct Block {
    line: usize,
    info: String,
    run_by: Option<Vec<String>>,
    body: Vec<String>,
}

impl Block {
    /// The block's commands: continuation lines joined, comments and blank lines dropped.
    fn commands(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut pending = String::new();
        for line in &self.body {
            if pending.is_empty() && line.trim_start().starts_with('#') {
                continue;
            }
            match line.trim_end().strip_suffix('\\') {
                Some(head) => pending.push_str(head),
                None => {
                    pending.push_str(line);
                    let command = normalise(strip_comment(&pending));
                    if !command.is_empty() {
                        out.push(command);
                    }
                    pending.clear();
                }
            }
        }
        out
    }
}

/// A Markdown file of the manual, relative to the repository's root.
fn read(page: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(page)).unwrap_or_else(|e| panic!("{page}: {e}"))
}

/// README.md and every docs/*.md, sorted.
fn pages() -> Vec<String> {
    let mut pages: Vec<String> = std::fs::read_dir(Path::new(ROOT).join("docs"))
        .expect("docs/")
        .map(|e| e.expect("an entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    pages.sort();
    pages.insert(0, "README.md".to_owned());
    pages
}

/// The fenced blocks of a page, with the `<!-- run by: a, b -->` comment just above each.
fn blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(info) = lines[i].trim_start().strip_prefix("```") else {
            i += 1;
            continue;
        };
        let indent = lines[i].len() - lines[i].trim_start().len();
        let previous = lines[..i].iter().rev().find(|l| !l.trim().is_empty()).map_or("", |l| l.trim());
        let run_by = previous
            .strip_prefix("<!-- run by:")
            .and_then(|m| m.strip_suffix("-->"))
            .map(|m| m.split(',').map(|f| f.trim().to_owned()).collect());
        let start = i + 1;
        let mut end = start;
        while end < lines.len() && !lines[end].trim_start().starts_with("```") {
            end += 1;
        }
        let body = lines[start..end].iter().map(|l| l.get(indent..).unwrap_or(l.trim_start()).to_owned()).collect();
        out.push(Block { line: i + 1, info: info.trim().to_owned(), run_by, body });
        i = end + 1;
    }
    out
}

/// A command without its trailing `# comment` (a `#` after a blank, outside quotes).
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double, mut prev) = (false, false, ' ');
    for (at, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev.is_whitespace() => return &line[..at],
            _ => {}
        }
        prev = c;
    }
    line
}

/// Whitespace collapsed, line continuations joined.
fn normalise(text: &str) -> String {
    text.replace("\\\n", " ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A script's commands, one a line: continuation lines joined, comments dropped, whitespace
/// collapsed.
fn script_lines(text: &str) -> Vec<String> {
    let block =
        Block { line: 0, info: RUNNABLE.to_owned(), run_by: None, body: text.lines().map(str::to_owned).collect() };
    block.commands()
}

/// Whether a script's line runs `command` as written: the whole line, or the command followed by
/// a redirection, a pipe or a list operator.
fn runs(line: &str, command: &str) -> bool {
    line.strip_prefix(command).is_some_and(|rest| {
        rest.is_empty()
            || rest.strip_prefix(' ').is_some_and(|r| r.starts_with(['>', '|', '&', ';']) || r.starts_with("2>"))
    })
}

/// Whether this test runs the command itself (else a marker must name a file that does).
fn runnable(command: &str) -> bool {
    let program = command.split_whitespace().find(|w| !w.contains('=')).unwrap_or_default();
    ["kvgate", "curl", "pip", "python3"].contains(&program) || command.starts_with("cargo run --release -- ")
}

#[test]
fn every_command_block_is_run_here_or_by_the_file_its_marker_names() {
    let mut problems = Vec::new();
    for page in pages() {
        for block in blocks(&read(&page)) {
            let at = format!("{page}:{}", block.line);
            if ["", "bash", "console", "shell", "shell-session", "zsh"].contains(&block.info.as_str()) {
                problems.push(format!("{at}: a block marked `{}`; commands go in `sh` blocks", block.info));
            }
            if block.info != RUNNABLE {
                if let Some(prompt) = block.body.iter().find(|l| l.starts_with("$ ")) {
                    problems.push(format!("{at}: a command outside a `sh` block: {prompt}"));
                }
                continue;
            }
            let files = block.run_by.clone().unwrap_or_else(|| vec![THIS.to_owned()]);
            let texts: Vec<(String, Vec<String>)> = files
                .iter()
                .filter(|f| *f != THIS)
                .map(|f| {
                    (f.clone(), script_lines(&std::fs::read_to_string(Path::new(ROOT).join(f)).unwrap_or_default()))
                })
                .collect();
            let commands = block.commands();
            let in_file = |lines: &[String], command: &str| lines.iter().any(|line| runs(line, command));
            for command in &commands {
                let here = files.iter().any(|f| f == THIS) && runnable(command);
                if !here && !texts.iter().any(|(_, lines)| in_file(lines, command)) {
                    problems.push(format!("{at}: nothing runs `{command}` (run by: {files:?})"));
                }
            }
            for (file, lines) in &texts {
                if !commands.iter().any(|c| in_file(lines, c)) {
                    problems.push(format!("{at}: the marker names {file}, which runs none of the block's commands"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A process of a page (`kvgate serve`, `kvgate sim`), killed with its group when dropped.
struct Background {
    child: Child,
    command: String,
}

impl Drop for Background {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

fn kill_group(child: &mut Child) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
    let _ = child.kill();
    let _ = child.wait();
}

/// What one page's commands share: the port map, the environment and the servers it started.
struct Session {
    page: String,
    ports: BTreeMap<u16, u16>,
    dir: PathBuf,
    path: String,
    venv: PathBuf,
    background: Vec<Background>,
}

impl Session {
    fn new(page: &str, commands: &[String]) -> Self {
        let mut ports = BTreeMap::new();
        for port in DEMO_PORTS.into_iter().chain(commands.iter().flat_map(|c| fixed_ports(c))) {
            ports.entry(port).or_insert_with(free_port);
        }
        let dir = std::env::temp_dir().join(format!("kvgate-docs-{}-{}", std::process::id(), page.replace('/', "-")));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        std::fs::write(dir.join(".curlrc"), "fail-with-body\nmax-time = 60\nnoproxy = \"*\"\n").expect(".curlrc");
        let kvgate_dir = Path::new(env!("CARGO_BIN_EXE_kvgate")).parent().expect("the binary's folder");
        let python = commands.iter().any(|c| c.starts_with("pip ") || c.starts_with("python3 "));
        let venv = if python { python_venv() } else { Path::new(ROOT).join("target").join("grpc-venv").join("bin") };
        let path = format!("{}:{}:{}", kvgate_dir.display(), venv.display(), std::env::var("PATH").unwrap_or_default());
        let venv = venv.parent().expect("the venv").to_owned();
        Self { page: page.to_owned(), ports, dir, path, venv, background: Vec::new() }
    }

    /// The command as it runs here: the page's ports moved, `cargo run --release --` as `kvgate`.
    fn rewrite(&self, command: &str) -> String {
        let mut out =
            command.strip_prefix("cargo run --release -- ").map_or(command.to_owned(), |rest| format!("kvgate {rest}"));
        for (from, to) in &self.ports {
            for prefix in ["localhost:", "127.0.0.1:", "--port "] {
                out = replace_port(&out, prefix, *from, *to);
            }
        }
        if out == "kvgate serve" || out.starts_with("kvgate serve ") {
            let [proxy, grpc, admin] = DEMO_PORTS.map(|p| self.ports[&p]);
            out.push_str(&format!(
                " --proxy-addr 127.0.0.1:{proxy} --grpc-addr 127.0.0.1:{grpc} --admin-addr 127.0.0.1:{admin}"
            ));
        }
        out
    }

    fn command(&self, command: &str) -> Command {
        let mut cmd = Command::new("bash");
        cmd.args(["-o", "pipefail", "-c", command])
            .current_dir(ROOT)
            .env("PATH", &self.path)
            .env("CURL_HOME", &self.dir)
            .env("VIRTUAL_ENV", &self.venv)
            .stdin(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    }

    /// Runs one command of the page; its standard output.
    fn run(&mut self, original: &str) -> String {
        let command = self.rewrite(original);
        if command.starts_with("kvgate serve") || command.starts_with("kvgate sim ") {
            self.start(&command);
            return String::new();
        }
        let limit = if command.starts_with("pip ") { Duration::from_secs(600) } else { Duration::from_secs(180) };
        let (out, err) = (self.dir.join("stdout"), self.dir.join("stderr"));
        let child = self
            .command(&command)
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("bash runs");
        let status = wait(child, limit);
        let stdout = std::fs::read_to_string(&out).unwrap_or_default();
        let stderr = std::fs::read_to_string(&err).unwrap_or_default();
        assert!(
            status == Some(0),
            "{}: `{original}` (run as `{command}`) exited {status:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            self.page
        );
        stdout
    }

    /// Starts a server in the background and waits until it answers.
    fn start(&mut self, command: &str) {
        let log = self.dir.join(format!("server-{}.log", self.background.len()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = self
            .command(&format!("exec {command}"))
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("bash runs");
        let mut server = Background { child, command: command.to_owned() };
        let probe = if command.starts_with("kvgate serve") {
            (self.ports[&9090], "/readyz")
        } else {
            let port = command.split("--port ").nth(1).and_then(|p| p.split_whitespace().next()?.parse().ok());
            (port.expect("a simulator's --port"), "/health")
        };
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("{}: `{}` exited ({status}) at start:\n{log}", self.page, server.command);
            }
            if http_status(probe.0, probe.1) == Some(200) {
                break;
            }
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(Instant::now() < deadline, "{}: `{}` never answered {}:\n{log}", self.page, command, probe.1);
            std::thread::sleep(Duration::from_millis(50));
        }
        self.background.push(server);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.background.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits at most `limit` for a command (and its process group); its exit code, or None.
fn wait(mut child: Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                kill_group(&mut child);
                return status.code();
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                kill_group(&mut child);
                return None;
            }
        }
    }
}

/// `text` with `{prefix}{from}` replaced by `{prefix}{to}` where no digit follows.
fn replace_port(text: &str, prefix: &str, from: u16, to: u16) -> String {
    let needle = format!("{prefix}{from}");
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(&needle) {
        let after = &rest[at + needle.len()..];
        out.push_str(&rest[..at]);
        if after.starts_with(|c: char| c.is_ascii_digit()) {
            out.push_str(&needle);
        } else {
            out.push_str(&format!("{prefix}{to}"));
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The loopback ports a command names.
fn fixed_ports(command: &str) -> Vec<u16> {
    let mut ports = Vec::new();
    for prefix in ["localhost:", "127.0.0.1:", "--port "] {
        for piece in command.split(prefix).skip(1) {
            let digits: String = piece.chars().take_while(char::is_ascii_digit).collect();
            ports.extend(digits.parse::<u16>().ok());
        }
    }
    ports
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// The status of `GET path` on a loopback port, if it answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(conn, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").ok()?;
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    answer.get(9..12)?.parse().ok()
}

/// The virtual environment's `bin` folder (made once; the picker API tests use the same one).
fn python_venv() -> PathBuf {
    let venv = Path::new(ROOT).join("target").join("grpc-venv");
    if !venv.join("bin").join("pip").exists() {
        let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).status();
        assert!(made.is_ok_and(|s| s.success()), "python3 -m venv {}", venv.display());
    }
    venv.join("bin")
}

/// Runs every runnable command of a page in order; each command with its output.
fn run_page(page: &str) -> Vec<(String, String)> {
    let commands: Vec<String> = blocks(&read(page))
        .into_iter()
        .filter(|b| b.info == RUNNABLE)
        .filter(|b| b.run_by.as_ref().is_none_or(|files| files.iter().any(|f| f == THIS)))
        .flat_map(|b| b.commands())
        .filter(|c| runnable(c))
        .collect();
    let mut session = Session::new(page, &commands);
    commands.iter().map(|c| (c.clone(), session.run(c))).collect()
}

/// One test per page, so pages run side by side; `every_page_has_its_test` keeps the list whole.
macro_rules! pages {
    ($($test:ident => $page:literal),* $(,)?) => {
        const TESTED: &[&str] = &[$($page),*];
        $(#[test] fn $test() { run_page($page); })*
    };
}

pages! {
    readme_commands_run => "README.md",
    index_commands_run => "docs/README.md",
    bench_commands_run => "docs/bench.md",
    cluster_commands_run => "docs/cluster.md",
    configuration_commands_run => "docs/configuration.md",
    deployment_patterns_commands_run => "docs/deployment-patterns.md",
    envoy_commands_run => "docs/envoy.md",
    flow_control_commands_run => "docs/flow-control.md",
    kubernetes_commands_run => "docs/kubernetes.md",
    performance_commands_run => "docs/performance.md",
    picker_api_commands_run => "docs/picker-api.md",
    precise_routing_commands_run => "docs/precise-routing.md",
    proxy_commands_run => "docs/proxy.md",
    scheduling_commands_run => "docs/scheduling.md",
    simulator_commands_run => "docs/simulator.md",
}

#[test]
fn every_page_has_its_test() {
    let mut tested: Vec<String> = TESTED.iter().map(|p| (*p).to_owned()).collect();
    tested.push("docs/operations.md".to_owned()); // run by the explain test below
    tested.sort();
    let mut all = pages();
    all.sort();
    assert_eq!(tested, all, "a page of the manual without its test");
}

/// The operations page's commands run, and its `/debug/explain` example gets a decision.
#[test]
fn operations_commands_run_and_the_explain_example_gets_a_decision() {
    let outputs = run_page("docs/operations.md");
    let (_, answer) = outputs.iter().find(|(c, _)| c.contains("/debug/explain?")).expect("an explain example");
    let answer: serde_json::Value = serde_json::from_str(answer).expect("JSON");
    assert_eq!(answer["pool"], "demo", "{answer}");
    assert!(!answer["decision"].is_null(), "{answer}");
}

/// The plugin table's rows: its kind column and the backticked names in its types column.
fn plugin_table(page: &str) -> Vec<(String, Vec<String>)> {
    let table = page.split("## Scheduler plugins").nth(1).expect("a plugin table");
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
    let rows = plugin_table(&read("docs/scheduling.md"));
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
        assert!(names.iter().any(|n| n == kind), "`{kind}` is not in the table's `{}` row", row_of(category));
    }
    // And the table names no plugin the config would refuse.
    let plugin_suffixes = ["-filter", "-scorer", "-picker", "-handler", "-producer", "-decider"];
    for name in rows.iter().flat_map(|(_, names)| names) {
        if plugin_suffixes.iter().any(|s| name.ends_with(s)) {
            assert!(PLUGIN_TYPES.iter().any(|(t, _)| t == name), "the table lists `{name}`, which is no plugin type");
        }
    }
}

/// The parser the checks above rely on: markers, indented blocks, continuations, comments.
#[test]
fn blocks_and_commands_are_read_as_written() {
    let page = "text\n<!-- run by: tests/docs.rs, .ci/run -->\n```sh\nkvgate sim --port 8001   # a comment\n# a line\n\
                curl -s localhost:8001/x \\\n  -d '{\"a\":\"#1\"}'\n```\n\n   ```text\n   $ not a command\n   ```\n";
    let found = blocks(page);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].run_by.as_deref(), Some(&[THIS.to_owned(), ".ci/run".to_owned()][..]));
    assert_eq!(found[0].commands(), ["kvgate sim --port 8001", "curl -s localhost:8001/x -d '{\"a\":\"#1\"}'"]);
    assert_eq!((found[1].info.as_str(), found[1].body.as_slice()), ("text", &["$ not a command".to_owned()][..]));
    assert!(runnable("cargo run --release -- serve") && !runnable("cargo test") && !runnable("helm lint x"));
    assert!(runs("cargo test", "cargo test") && runs("helm lint x >/dev/null", "helm lint x"));
    assert!(!runs("cargo test --workspace", "cargo test") && !runs("echo cargo test", "cargo test"));
    assert_eq!(replace_port("localhost:80010 localhost:8001/", "localhost:", 8001, 5), "localhost:80010 localhost:5/");
}
