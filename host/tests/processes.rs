//! Rank processes over the host communicator (`--ranks processes`, TCP): the launcher, the
//! rendezvous, rank 0 relaying jobs, the worker loop, failures and SIGTERM, which multi-GPU users
//! run over NCCL. Driven through the CLI and HTTP only, with the real SmolLM2 and real processes;
//! process ids come from the launcher's `started rank r (pid p)` lines.

mod common;

use common::needle_doc;
use common::server::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

/// Whether the server logged `line`.
fn log_has(s: &Server, line: &str) -> bool {
    s.log.lock().unwrap().contains(line)
}

/// Worker process ids the launcher reported on stderr.
fn worker_pids(s: &Server) -> Vec<u32> {
    s.log
        .lock()
        .unwrap()
        .lines()
        .filter_map(|l| l.split("(pid ").nth(1)?.strip_suffix(')')?.parse().ok())
        .collect()
}

/// Whether `pid` is a live process (a zombie waiting to be reaped counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|st| {
            let state = st.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        })
        .unwrap_or(false)
}

fn wait_gone(pids: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "rank processes left: {:?}",
            pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill(sig: &str, pid: u32) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// A valid APB request too short for several ranks (it runs on one rank).
fn short() -> Value {
    ask("Paris is the capital of France.\n\nWhat is the capital of France?")
}

/// The text a raw SSE response carried.
fn streamed_text(raw: &str) -> String {
    raw.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

/// An APB server over 4 rank processes (extra flags after).
fn apb_server(extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut args = vec![
        "--attention",
        "apb",
        "--world-size",
        "4",
        "--ranks",
        "processes",
    ];
    args.extend(extra);
    Server::start_env(&args, env)
}

/// A needle question whose context spans the 4 ranks.
fn needle(sentences: usize, max_tokens: usize) -> Value {
    json!({"messages": [{"role": "user",
        "content": format!("{}\n\nWhat is the special magic number?", needle_doc(sentences))}],
        "max_tokens": max_tokens})
}

/// The checks of the thread-rank server tests, over processes: a ≥ 2K-token needle on 4 ranks,
/// stream equals non-stream, batched requests each equal to their run alone (two spanning the
/// ranks in one decode step), a full queue gets 429, a vanished stream stops its generation on
/// every rank, the key is enforced; a prompt too short for 4 ranks runs on one rank, spread
/// (`--spread-short-requests on`) to the last when all are idle, and says so.
#[test]
fn server_over_4_rank_processes() {
    // Two sequences at a time, so the three below run batched and two long ones fill the batch.
    let s = apb_server(
        &[
            "--max-queued",
            "3",
            "--max-num-seqs",
            "2",
            // (So that a ~400-token prompt spans the 4 ranks.)
            "--min-rank-tokens",
            "64",
            "--anchor-len",
            "32",
            "--passing-len",
            "16",
            "--api-key",
            "k3y",
            "--spread-short-requests",
            "on",
        ],
        &[],
    )
    .with_key("k3y");
    assert_eq!(worker_pids(&s).len(), 3);
    let log = s.log.lock().unwrap().clone();
    assert!(
        log.contains("ranks: 4 processes over the host communicator"),
        "{log}"
    );
    let (code, v) = s.chat(needle(200, 12));
    assert_eq!(code, 200, "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() >= 2000, "{v}");
    assert_eq!(v["apb"]["ranks"], 4, "{v}");
    assert_eq!(v["apb"]["rank_mode"], "processes", "{v}");
    assert_eq!(v["apb"]["comm"], "host", "{v}");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("73914"),
        "{v}"
    );
    // Stream equals non-stream (a shorter prompt, still over 4 ranks).
    let req = needle(90, 12);
    let (code, v) = s.chat(req.clone());
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["apb"]["ranks"], 4, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    let mut sreq = req;
    sreq["stream"] = json!(true);
    let (code, body) = s.chat_raw(&sreq.to_string());
    assert_eq!(code, 200, "{body}");
    let streamed: String = sse_chunks(&body)
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);

    // The key is enforced.
    let (code, text) = match Server::agent()
        .post(&format!("{}/v1/chat/completions", s.base))
        .send_json(short())
    {
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        other => panic!("want 401, got {other:?}"),
    };
    assert_eq!(code, 401, "{text}");

    // A prompt too short for 4 ranks runs on one rank: with short requests spread, on an idle
    // server the last rank (rank 0 also relays and samples); it prefills there, its KV stays
    // there and its rows attend there (the text equals rank 0's below, when batched).
    let (code, v) = s.chat(ask("\n\nWhat is the capital of France?"));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["apb"]["ranks"], 1, "{v}");
    assert_eq!(v["apb"]["first_rank"], 3, "{v}");
    assert!(
        v["apb"]["plan_notes"]
            .to_string()
            .contains("ran on one rank"),
        "{v}"
    );
    assert!(log_has(&s, "short requests spread over the ranks"));

    // Batched over rank processes, each request gets what it gets alone: two that span the 4
    // ranks decode together (one collective a layer for both) while a third (one rank)
    // waits for a slot, then decodes beside the one still running.
    let q = "What is the special magic number?";
    let spanning = |sentences: usize| {
        json!({"messages": [{"role": "user", "content": format!("{}\n\n{q}", needle_doc(sentences))}],
            "max_tokens": 24, "ignore_eos": true})
    };
    let reqs = [spanning(30), spanning(40), short()];
    let alone: Vec<Value> = reqs
        .iter()
        .map(|r| {
            let (code, v) = s.chat(r.clone());
            assert_eq!(code, 200, "{v}");
            v
        })
        .collect();
    let ranks: Vec<u64> = alone
        .iter()
        .map(|v| v["apb"]["ranks"].as_u64().unwrap())
        .collect();
    assert_eq!(ranks, [4, 4, 1], "{alone:?}");
    let mut handles: Vec<_> = reqs[..2]
        .iter()
        .map(|r| chat_in_background(&s, r))
        .collect();
    wait_for(&s, "the two never decoded together", |h| {
        h["running_sequences"] == 2
    });
    handles.push(chat_in_background(&s, &reqs[2]));
    assert_batched_equal_alone(&s, handles, &alone);

    // A full queue: 429 with Retry-After.
    let long = json!({"messages": [{"role": "user", "content": "Paris is a city.\n\nTell me a long story."}],
        "max_tokens": 100, "ignore_eos": true});
    let running: Vec<_> = (0..2).map(|_| chat_in_background(&s, &long)).collect();
    wait_for(&s, "never both running", |h| h["running_sequences"] == 2);
    let queued: Vec<_> = (0..3).map(|_| raw_chat(&s, &short())).collect();
    wait_for(&s, "never queued", |h| h["queue_depth"] == 3);
    let (code, retry, text) = s.post("/v1/chat/completions", &short().to_string(), &[]);
    assert_eq!(code, 429, "{text}");
    assert!(retry.is_some());
    drop(queued);
    for r in running {
        assert_eq!(r.join().unwrap().0, 200);
    }

    // A client that vanishes mid-stream stops its generation on every rank.
    let story = json!({"messages": [{"role": "user",
        "content": format!("{}\n\nTell me a long story.", needle_doc(40))}],
        "max_tokens": 3000, "ignore_eos": true, "stream": true});
    let before = s.metric("apb_cancelled_total", "running");
    {
        let mut c = raw_chat(&s, &story);
        read_until(&mut c, |seen| seen.matches("\"content\"").count() >= 4);
    }
    let t = Instant::now();
    let (code, v) = s.chat(short());
    assert_eq!(code, 200, "{v}");
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert_eq!(s.metric("apb_cancelled_total", "running"), before + 1.0);
}

/// The first-token logits and greedy tokens of `apb generate` (one JSON object).
fn generate(method: &str, world: &str, ranks: &str, extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_apb"))
        .args(["generate", "--chat", "--json", "--first-logits"])
        .args([
            "--max-new-tokens",
            "5",
            "--ignore-eos",
            "--min-rank-tokens",
            "0",
        ])
        .args([
            "--attention",
            method,
            "--world-size",
            world,
            "--ranks",
            ranks,
        ])
        .args(extra)
        .env_remove("RAYON_NUM_THREADS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{method} {ranks}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("not JSON: {stdout}"))
}

/// Every distributed method over rank processes equals the same method over thread ranks, bit
/// for bit (first-token logits and greedy tokens), on plans that use every rank.
#[test]
fn rank_processes_equal_thread_ranks_bit_for_bit() {
    let prompt = format!("{}\n\nWhat is the special magic number?", needle_doc(24));
    for (method, world) in [
        ("ring", "4"),
        ("zigzag", "4"),
        ("ulysses", "3"), // SmolLM2's 3 KV heads split over 3 ranks
        ("star", "4"),
        ("apb", "4"),
        ("spava", "2"), // 4 chunks; its second gather in flight over the host communicator
    ] {
        let extra = [
            "--prompt",
            &prompt,
            "--anchor-len",
            "32",
            "--passing-len",
            "16",
        ];
        let extra = if matches!(method, "apb" | "star" | "spava") {
            &extra[..]
        } else {
            &extra[..2]
        };
        let t = generate(method, world, "threads", extra);
        let p = generate(method, world, "processes", extra);
        assert_eq!(t["world_size"].to_string(), world, "{method}: {t}");
        assert_eq!(p["world_size"].to_string(), world, "{method}: {p}");
        assert_eq!(
            (t["rank_mode"].as_str(), p["rank_mode"].as_str()),
            (Some("threads"), Some("processes"))
        );
        assert_eq!(
            (t["comm"].as_str(), p["comm"].as_str()),
            (Some("local"), Some("host"))
        );
        assert_eq!(t["text"], p["text"], "{method}");
        let (lt, lp) = (
            t["first_logits"].as_array().unwrap(),
            p["first_logits"].as_array().unwrap(),
        );
        assert!(lt.len() > 1000, "{method}: {} logits", lt.len());
        let bits = |v: &Value| (v.as_f64().unwrap() as f32).to_bits();
        let differ = lt
            .iter()
            .zip(lp)
            .filter(|(a, b)| bits(a) != bits(b))
            .count();
        assert_eq!(
            differ,
            0,
            "{method}: {differ} of {} logits differ",
            lt.len()
        );
    }
}

/// A server over 4 rank processes (3 sequences at a time), one request in flight (streaming,
/// with a 4-rank prompt) and three sent behind it, which wait until `full(/health)` (all
/// queued during the long prefill; in the decode batch, two beside it and one queued); `kill
/// -9` of worker rank 2 once `ready(stream so far)` holds: the stream gets an error event and
/// `[DONE]`, every request behind it a 5xx (503 queued, 500 running), `/health` says failed,
/// the server exits non-zero and no rank process is left. Returns the text streamed before the
/// error and the codes of the three behind, sorted.
fn kill_a_worker_when(
    sentences: usize,
    max_tokens: usize,
    full: impl Fn(&Value) -> bool,
    ready: impl Fn(&str) -> bool,
) -> (String, Vec<u16>) {
    let mut s = apb_server(&["--max-num-seqs", "3"], &[]);
    let pids = worker_pids(&s);
    assert_eq!(pids.len(), 3);
    let mut req = needle(sentences, max_tokens);
    req["stream"] = json!(true);
    req["ignore_eos"] = json!(true);
    let mut c = raw_chat(&s, &req);
    wait_for(&s, "never started", |h| h["running"] == true);
    let mut behind = short();
    behind["max_tokens"] = json!(400);
    behind["ignore_eos"] = json!(true);
    let behind: Vec<_> = (0..3).map(|_| chat_in_background(&s, &behind)).collect();
    wait_for(&s, "the batch never filled", full);
    let seen = read_until(&mut c, ready);
    let t = Instant::now();
    kill("-9", pids[1]);
    // The rest of the stream: an error event, then [DONE] (the connection itself stays open
    // until the process exits).
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let rest = read_until(&mut c, |r| r.contains("data: [DONE]"));
    let error_at = rest
        .find("\"error\"")
        .unwrap_or_else(|| panic!("no error event: {rest}"));
    assert!(rest[error_at..].contains("data: [DONE]"), "{rest}");
    assert!(rest.contains("rank"), "{rest}");
    // Until it exits (2 s after the failure), the server says why.
    let (code, h) = s.get("/health");
    assert_eq!(code, 503, "{h}");
    assert!(h.contains("failed"), "{h}");
    let mut codes = vec![];
    for h in behind {
        let (code, text) = h.join().unwrap();
        assert!(code == 503 || code == 500, "{code} {text}");
        assert!(text.contains("rank"), "{text}");
        codes.push(code);
    }
    codes.sort();
    let st = s
        .wait_exit(Duration::from_secs(30))
        .expect("the server must exit");
    assert!(!st.success(), "{st}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    wait_gone(&pids, Duration::from_secs(10));
    (streamed_text(&(seen + &rest)), codes)
}

#[test]
fn a_worker_killed_during_prefill_fails_the_server_cleanly() {
    // A ~7.5K-token prompt (and max_tokens within the 8K context): its prefill takes many
    // seconds, the three behind it wait; kill once the stream has opened.
    let (text, codes) = kill_a_worker_when(
        620,
        100,
        |h| h["queue_depth"] == 3,
        |seen| seen.contains("\"role\""),
    );
    assert_eq!(text, "", "the kill came after the prefill");
    assert_eq!(codes, [503; 3]);
}

#[test]
fn a_worker_killed_during_decode_fails_the_server_cleanly() {
    // A full batch: the long stream and two behind it decode, the third waits.
    let (text, codes) = kill_a_worker_when(
        90,
        3000,
        |h| h["running_sequences"] == 3 && h["queue_depth"] == 1,
        |seen| streamed_text(seen).len() >= 8,
    );
    assert!(!text.is_empty());
    assert_eq!(codes, [500, 500, 503]);
}

#[test]
fn workers_exit_when_rank_0_is_killed() {
    let mut s = apb_server(&[], &[]);
    let pids = worker_pids(&s);
    assert_eq!(pids.len(), 3);
    kill("-9", s.child.id());
    let _ = s.wait_exit(Duration::from_secs(10));
    wait_gone(&pids, Duration::from_secs(15));
}

/// Two launchers on one machine (`--nnodes 2`, loopback) serve a request together; SIGTERM with
/// it in flight and none queued: it finishes and every process of both nodes exits 0.
#[test]
fn two_nodes_serve_together_and_sigterm_exits_0() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let nodes = ["--nnodes", "2", "--master-port", &port];
    let log1 = tempfile::NamedTempFile::new().unwrap();
    /// Node 1's launcher, killed if the test fails.
    struct Node(std::process::Child);
    impl Drop for Node {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut node1 = Node(
        Command::new(env!("CARGO_BIN_EXE_apb"))
            .args(["serve", "--attention", "apb", "--world-size", "4"])
            .args(["--ranks", "processes", "--node-rank", "1"])
            .args(nodes)
            .stdout(std::process::Stdio::null())
            .stderr(log1.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    let mut with_node = nodes.to_vec();
    with_node.extend(["--shutdown-timeout", "600"]);
    let mut s = apb_server(&with_node, &[]);
    let mut pids = worker_pids(&s);
    assert_eq!(pids.len(), 1, "node 0 starts one other rank");
    pids.push(node1.0.id());
    let mut req = needle(180, 40);
    req["ignore_eos"] = json!(true);
    let inflight = chat_in_background(&s, &req);
    wait_for(&s, "never started", |h| h["running"] == true);
    kill("-TERM", s.child.id());
    let (code, text) = inflight.join().unwrap();
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["apb"]["ranks"], 4, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 40, "{v}");
    let st = s.wait_exit(Duration::from_secs(30)).expect("node 0 exits");
    assert!(st.success(), "{st}: {}", s.log.lock().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let st1 = loop {
        if let Some(st) = node1.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "node 1 did not exit");
        std::thread::sleep(Duration::from_millis(100));
    };
    let log1 = std::fs::read_to_string(log1.path()).unwrap();
    assert!(st1.success(), "node 1: {st1}: {log1}");
    // Node 1's launcher started rank 3.
    let rank3: Vec<u32> = log1
        .lines()
        .filter_map(|l| l.split("(pid ").nth(1)?.strip_suffix(')')?.parse().ok())
        .collect();
    assert_eq!(rank3.len(), 1, "{log1}");
    pids.extend(rank3);
    wait_gone(&pids, Duration::from_secs(10));
}

/// A worker that stalls (alive, connected) at its 40th collective of the first job: every rank's
/// wait ends at `--collective-timeout` (10 s); the request gets a 500 naming the wait, the queued
/// one 503, the server exits non-zero and no rank process is left.
#[cfg(feature = "fault-injection")]
#[test]
fn fault_a_stalled_worker_fails_the_server_within_the_timeout() {
    let mut s = apb_server(
        &["--collective-timeout", "10"],
        &[("APB_FAULT_STALL_COLLECTIVE", "2:40")],
    );
    let pids = worker_pids(&s);
    assert_eq!(pids.len(), 3);
    let t = Instant::now();
    let inflight = chat_in_background(&s, &needle(180, 20));
    wait_for(&s, "never started", |h| h["running"] == true);
    let queued = chat_in_background(&s, &short());
    let (code, text) = inflight.join().unwrap();
    assert_eq!(code, 500, "{text}");
    assert!(text.contains("rank"), "{text}");
    let (code, h) = s.get("/health");
    assert_eq!(code, 503, "{h}");
    assert!(t.elapsed() < Duration::from_secs(40), "{:?}", t.elapsed());
    assert_eq!(queued.join().unwrap().0, 503);
    let st = s
        .wait_exit(Duration::from_secs(30))
        .expect("the server must exit");
    assert!(!st.success(), "{st}");
    // The first rank to give up names the stalled one (the others may report its abort).
    let log = s.log.lock().unwrap().clone();
    assert!(log.contains("stalling at collective 40"), "{log}");
    assert!(log.contains("waited 10s for rank 2"), "{log}");
    wait_gone(&pids, Duration::from_secs(10));
}
