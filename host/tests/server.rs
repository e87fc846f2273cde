//! `apb serve` end to end: the real server on the default model (SmolLM2), a real HTTP client.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `apb serve` on a free port; killed on drop.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_apb"))
            .args(["serve", "--port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start apb serve");
        let mut err = BufReader::new(child.stderr.take().expect("stderr"));
        let mut seen = String::new();
        let base = loop {
            let mut line = String::new();
            if err.read_line(&mut line).expect("read stderr") == 0 {
                let _ = child.kill();
                panic!("apb serve exited before listening: {seen}");
            }
            if let Some(url) = line.trim().strip_prefix("listening on ") {
                break url.to_string();
            }
            seen.push_str(&line);
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in err.lines() {});
        Self { child, base }
    }

    fn agent() -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(300))
            .build()
    }

    /// POSTs `body` (raw text) to the chat endpoint: (status, body text).
    fn chat_raw(&self, body: &str) -> (u16, String) {
        let r = Self::agent()
            .post(&format!("{}/v1/chat/completions", self.base))
            .set("Content-Type", "application/json")
            .send_string(body);
        match r {
            Ok(resp) => (resp.status(), resp.into_string().expect("body")),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().expect("body")),
            Err(e) => panic!("request failed: {e}"),
        }
    }

    fn chat(&self, body: Value) -> (u16, Value) {
        let (code, text) = self.chat_raw(&body.to_string());
        (code, serde_json::from_str(&text).expect("a JSON response"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ask(question: &str) -> Value {
    json!({"messages": [{"role": "user", "content": question}], "max_tokens": 12})
}

fn error_message(v: &Value) -> &str {
    v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {v}"))
}

#[test]
fn chat_completions_json_and_stream() {
    let s = Server::start(&[]);
    let models: Value = Server::agent()
        .get(&format!("{}/v1/models", s.base))
        .call()
        .expect("GET /v1/models")
        .into_json()
        .expect("JSON");
    let id = models["data"][0]["id"]
        .as_str()
        .expect("a model id")
        .to_string();
    assert!(id.contains("SmolLM2"), "{models}");

    let mut req = ask("What is the capital of France?");
    req["model"] = json!(id);
    let (code, v) = s.chat(req.clone());
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "{v}");
    let usage = &v["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5, "{v}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    // Streaming: server-sent events whose deltas add up to the same greedy answer.
    req["stream"] = json!(true);
    let (code, body) = s.chat_raw(&req.to_string());
    assert_eq!(code, 200, "{body}");
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("a JSON chunk"))
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text, "stream and JSON answers differ");
    let last = chunks.last().unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
}

#[test]
fn bad_requests_get_4xx_with_a_message() {
    let s = Server::start(&[]);
    let (code, body) = s.chat_raw("{\"messages\": [");
    assert_eq!(code, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(error_message(&v).contains("JSON"), "{v}");

    let (code, v) = s.chat(json!({"messages": []}));
    assert_eq!(code, 400);
    assert!(error_message(&v).contains("messages"), "{v}");

    let (code, v) = s.chat(json!({"prompt": "no messages field"}));
    assert_eq!(code, 400);
    assert!(error_message(&v).contains("messages"), "{v}");

    let mut req = ask("hi");
    req["model"] = json!("gpt-4");
    let (code, v) = s.chat(req);
    assert_eq!(code, 404);
    assert!(error_message(&v).contains("gpt-4"), "{v}");

    let mut req = ask("hi");
    req["temperature"] = json!(-1.0);
    let (code, v) = s.chat(req);
    assert_eq!(code, 400);
    assert!(error_message(&v).contains("temperature"), "{v}");

    let req = json!({"messages": [{"role": "wizard", "content": "hi"}]});
    let (code, v) = s.chat(req);
    assert_eq!(code, 400);
    assert!(error_message(&v).contains("wizard"), "{v}");

    // Over the model's context (SmolLM2: 8192 tokens), in a body larger than axum's default cap.
    let long = "lorem ipsum dolor ".repeat(150_000);
    assert!(long.len() > 2 << 20);
    let (code, v) = s.chat(ask(&long));
    assert_eq!(code, 400);
    assert!(error_message(&v).contains("context"), "{v}");

    // The server still answers after all that.
    let (code, v) = s.chat(ask("What is the capital of France?"));
    assert_eq!(code, 200, "{v}");
}

#[test]
fn apb_server_answers_single_turn_and_rejects_multi_turn() {
    let s = Server::start(&["--attention", "apb", "--world-size", "2"]);
    let doc = "Paris is the capital of France. Berlin is the capital of Germany. \
               Madrid is the capital of Spain.";
    let (code, v) = s.chat(ask(&format!("{doc}\n\nWhat is the capital of France?")));
    assert_eq!(code, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "{v}");

    let (code, v) = s.chat(json!({"messages": [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "What is the capital of France?"}]}));
    assert_eq!(code, 400);
    assert!(error_message(&v).contains("single-turn"), "{v}");

    let (code, v) = s.chat(ask("a message without a question paragraph"));
    assert_eq!(code, 400);
    assert!(error_message(&v).contains("question"), "{v}");
}
