//! The real `apb serve` as the server tests drive it: started on a free port, spoken to over
//! HTTP (ureq) or raw TCP (a client that can vanish). Shared by several test crates; each uses a
//! part, hence `dead_code` is allowed.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `apb serve` on a free port; killed on drop. Its stderr is kept in `log`.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub addr: String,
    pub log: Arc<Mutex<String>>,
    /// Sent as `Authorization: Bearer` by every helper (the server's `--api-key`).
    pub key: Option<String>,
}

impl Server {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_env(extra, &[])
    }

    /// Starts the server and waits until the model is loaded (`ready:` on stderr).
    pub fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_apb"));
        cmd.args(["serve", "--port", "0"])
            .args(extra)
            .env_remove("APB_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start apb serve");
        let err = BufReader::new(child.stderr.take().expect("stderr"));
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in err.lines().map_while(Result::ok) {
                    if let Some(url) = line.trim().strip_prefix("listening on ") {
                        let _ = tx.send(Some(url.to_string()));
                    }
                    if line.starts_with("ready:") {
                        let _ = tx.send(None);
                    }
                    log.lock().unwrap().push_str(&format!("{line}\n"));
                }
            });
        }
        let mut base = None;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Some(url)) => base = Some(url),
                Ok(None) => break,
                Err(_) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        panic!("apb serve exited ({st}): {}", log.lock().unwrap());
                    }
                    assert!(
                        Instant::now() < deadline,
                        "not ready: {}",
                        log.lock().unwrap()
                    );
                }
            }
        }
        let base = base.expect("listening line before ready");
        let addr = base.trim_start_matches("http://").to_string();
        Self {
            child,
            base,
            addr,
            log,
            key: None,
        }
    }

    /// The helpers send `key` from now on (a server started with `--api-key key`).
    pub fn with_key(mut self, key: &str) -> Self {
        self.key = Some(key.to_string());
        self
    }

    pub fn agent() -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(300))
            .build()
    }

    /// POSTs raw `body` to `path` with extra headers: (status, Retry-After, body text).
    pub fn post(
        &self,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Option<String>, String) {
        let mut r = Self::agent()
            .post(&format!("{}{path}", self.base))
            .set("Content-Type", "application/json");
        if let Some(key) = &self.key {
            r = r.set("Authorization", &format!("Bearer {key}"));
        }
        for (k, v) in headers {
            r = r.set(k, v);
        }
        match r.send_string(body) {
            Ok(resp) => (resp.status(), None, resp.into_string().expect("body")),
            Err(ureq::Error::Status(code, resp)) => {
                let retry = resp.header("Retry-After").map(String::from);
                (code, retry, resp.into_string().expect("body"))
            }
            Err(e) => panic!("request failed: {e}"),
        }
    }

    pub fn chat_raw(&self, body: &str) -> (u16, String) {
        let (code, _, text) = self.post("/v1/chat/completions", body, &[]);
        (code, text)
    }

    pub fn chat(&self, body: Value) -> (u16, Value) {
        let (code, text) = self.chat_raw(&body.to_string());
        (
            code,
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
        )
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        match Self::agent().get(&format!("{}{path}", self.base)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    /// A metric's value from `/metrics` (sum over label sets matching `labels`).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn ask(question: &str) -> Value {
    json!({"messages": [{"role": "user", "content": question}], "max_tokens": 12})
}

pub fn error_message(v: &Value) -> &str {
    v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {v}"))
}

/// Chunks of an SSE body, `[DONE]` checked and removed.
pub fn sse_chunks(body: &str) -> Vec<Value> {
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("a JSON chunk"))
        .collect()
}

/// POSTs `body` to the chat endpoint on another thread: the status (0 if the connection failed)
/// and the body text.
pub fn chat_in_background(s: &Server, body: &Value) -> std::thread::JoinHandle<(u16, String)> {
    let url = format!("{}/v1/chat/completions", s.base);
    let body = body.to_string();
    let auth = s.key.as_ref().map(|k| format!("Bearer {k}"));
    std::thread::spawn(move || {
        let mut r = Server::agent()
            .post(&url)
            .set("Content-Type", "application/json");
        if let Some(a) = &auth {
            r = r.set("Authorization", a);
        }
        match r.send_string(&body) {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    })
}

pub fn health(s: &Server) -> Value {
    serde_json::from_str(&s.get("/health").1).unwrap()
}

pub fn wait_for(s: &Server, what: &str, ok: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = health(s);
        if ok(&h) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {h}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `body` to the chat endpoint on a raw connection (a client that can vanish).
pub fn raw_chat(s: &Server, body: &Value) -> TcpStream {
    let body = body.to_string();
    let mut c = TcpStream::connect(&s.addr).unwrap();
    let auth = s
        .key
        .as_ref()
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        c,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    c
}

/// Reads `c` until what arrived satisfies `done` (fails if the stream ends first); returns it.
pub fn read_until(c: &mut TcpStream, done: impl Fn(&str) -> bool) -> String {
    use std::io::Read;
    let mut seen = String::new();
    let mut buf = [0u8; 8192];
    while !done(&seen) {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    seen
}

/// Joins `handles` (requests sent together, in the order of `alone`: their answers run one at a
/// time) and checks that each batched answer equals its run alone, token for token (choices and
/// usage), and that some decode step had two sequences spanning several ranks.
pub fn assert_batched_equal_alone(
    s: &Server,
    handles: Vec<std::thread::JoinHandle<(u16, String)>>,
    alone: &[Value],
) {
    for (i, (h, want)) in handles.into_iter().zip(alone).enumerate() {
        let (code, text) = h.join().unwrap();
        assert_eq!(code, 200, "{text}");
        let got: Value = serde_json::from_str(&text).unwrap();
        for key in ["choices", "usage"] {
            assert_eq!(got[key], want[key], "request {i} batched vs alone");
        }
    }
    assert!(
        s.metric("apb_decode_spanning_sequences_bucket", "le=\"1\"")
            < s.metric("apb_decode_spanning_sequences_count", ""),
        "no decode step had two sequences spanning several ranks"
    );
}
