//! A small Chrome DevTools Protocol client for the browser tests: it starts Debian's headless
//! `chromium`, opens one page and speaks CDP to it over a WebSocket written here (a text-frame
//! client is a few dozen lines; no extra dependency).
//!
//! Shared by `crates/celeriac-web/tests/browser.rs` and the examples' progress-bar test.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Once;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const CANDIDATES: [&str; 4] = [
    "/usr/bin/chromium",
    "chromium",
    "chromium-browser",
    "google-chrome",
];

/// The first Chromium that runs; when none does, `apt-get install -y chromium` is tried once.
fn chromium() -> Option<String> {
    let runs = |p: &str| {
        std::process::Command::new(p)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if let Some(p) = CANDIDATES.iter().find(|p| runs(p)) {
        return Some((*p).to_owned());
    }
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        eprintln!("chromium is missing: trying `apt-get install -y chromium` once");
        let _ = std::process::Command::new("apt-get")
            .args(["install", "-y", "chromium"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    });
    CANDIDATES.iter().find(|p| runs(p)).map(|p| (*p).to_owned())
}

/// A headless Chromium with one page, driven over CDP. Dropping it kills the browser.
pub(crate) struct Browser {
    child: tokio::process::Child,
    profile: PathBuf,
    ws: Ws,
    next_id: u64,
    /// JavaScript exceptions and console errors the page reported.
    pub(crate) errors: Vec<String>,
}

impl Browser {
    /// Starts Chromium, or returns `None` after a visible notice when it cannot be run (a
    /// panic instead under `CELERIAC_REQUIRE_SERVICES=1`).
    pub(crate) async fn launch() -> Option<Browser> {
        let Some(program) = chromium() else {
            // Prints the notice (or panics when skipping is forbidden).
            celeriac_test::services::require_program("chromium");
            return None;
        };
        let profile = celeriac_test::services::test_dir().join(format!(
            "chromium-{}-{}",
            std::process::id(),
            celeriac::core::protocol::new_id()
        ));
        std::fs::create_dir_all(&profile).expect("a profile directory");
        let mut child = tokio::process::Command::new(program)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID" on stderr.
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let port = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                    return rest.split('/').next().and_then(|p| p.parse::<u16>().ok());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .expect("chromium printed its DevTools port");
        // Keep draining stderr so the browser never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let targets = http_get(port, "/json/list").await;
        let targets: Value = serde_json::from_str(&targets).expect("targets JSON");
        let url = targets
            .as_array()
            .and_then(|a| a.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_owned();
        let path = url.splitn(4, '/').nth(3).expect("a ws path");
        let ws = Ws::connect(port, &format!("/{path}")).await;
        let mut b = Browser {
            child,
            profile,
            ws,
            next_id: 0,
            errors: Vec::new(),
        };
        b.call("Runtime.enable", json!({})).await;
        b.call("Page.enable", json!({})).await;
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 860, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        Some(b)
    }

    /// Calls `method` and returns its result; a CDP error panics (a test bug).
    pub(crate) async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws.send(&msg.to_string()).await;
        loop {
            let text = tokio::time::timeout(Duration::from_secs(60), self.ws.recv())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} in 60 s"));
            let v: Value = serde_json::from_str(&text).expect("CDP JSON");
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    panic!("CDP {method} failed: {e}");
                }
                return v["result"].clone();
            }
            match v["method"].as_str() {
                Some("Runtime.exceptionThrown") => {
                    let d = &v["params"]["exceptionDetails"];
                    self.errors.push(format!(
                        "{} {}",
                        d["text"].as_str().unwrap_or(""),
                        d["exception"]["description"].as_str().unwrap_or("")
                    ));
                }
                Some("Runtime.consoleAPICalled") if v["params"]["type"] == "error" => {
                    self.errors.push(v["params"]["args"].to_string());
                }
                _ => {}
            }
        }
    }

    /// Opens `url` and waits for its `load` event.
    pub(crate) async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for(
            "document.readyState === 'complete'",
            Duration::from_secs(20),
        )
        .await;
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its value; a thrown
    /// exception is an `Err` with its description.
    pub(crate) async fn try_eval(&mut self, expression: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true,
                       "userGesture": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(e["exception"]["description"]
                .as_str()
                .map_or_else(|| e.to_string(), str::to_owned));
        }
        Ok(r["result"]["value"].clone())
    }

    /// [`Browser::try_eval`], panicking on an exception.
    pub(crate) async fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression)
            .await
            .unwrap_or_else(|e| panic!("{expression}: {e}"))
    }

    /// Waits until `expression` (or the promise it gives) is truthy, panicking with the page's text after `timeout`.
    pub(crate) async fn wait_for(&mut self, expression: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let v = self
                .try_eval(&format!("(async () => !!(await ({expression})))()"))
                .await;
            if v == Ok(json!(true)) {
                return;
            }
            if start.elapsed() > timeout {
                let text = self
                    .try_eval("document.body ? document.body.innerText.slice(0, 3000) : ''")
                    .await
                    .unwrap_or_default();
                panic!(
                    "waited {timeout:?} for {expression} ({v:?}); JS errors {:?}; the page says:\n{}",
                    self.errors,
                    text.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Clicks the first element matching `selector` (a CSS selector), panicking if none.
    pub(crate) async fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let found = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return false; e.click(); return true; }})()"
            ))
            .await;
        assert_eq!(found, json!(true), "nothing to click at {selector}");
    }

    /// A PNG of the page's viewport, written to `path`; returns its size in bytes.
    pub(crate) async fn screenshot(&mut self, path: &Path) -> usize {
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": false}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot directory");
        }
        std::fs::write(path, &png).expect("write the screenshot");
        png.len()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// `GET path` on the DevTools HTTP endpoint; the body.
async fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to DevTools");
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // The DevTools server keeps the connection open: read the head, then Content-Length bytes.
    let mut r = BufReader::new(s);
    let read = async {
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap() == 0 || line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await.unwrap();
        String::from_utf8_lossy(&body).into_owned()
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("DevTools answers")
}

/// A WebSocket client for text messages (RFC 6455): masked frames out, any frames in.
struct Ws {
    stream: BufReader<TcpStream>,
    mask: u32,
}

impl Ws {
    async fn connect(port: u16, path: &str) -> Ws {
        let s = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to the page");
        let mut stream = BufReader::new(s);
        let key = base64::engine::general_purpose::STANDARD
            .encode(&celeriac::core::protocol::new_id().as_bytes()[..16]);
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut status = String::new();
        stream.read_line(&mut status).await.unwrap();
        assert!(
            status.contains(" 101 "),
            "WebSocket upgrade refused: {status}"
        );
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        Ws {
            stream,
            mask: 0x5a17_c3e9,
        }
    }

    async fn send(&mut self, text: &str) {
        let data = text.as_bytes();
        let mut frame = vec![0x81u8]; // FIN, text
        match data.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        self.mask = self.mask.rotate_left(7) ^ 0x9e37_79b9;
        let mask = self.mask.to_be_bytes();
        frame.extend_from_slice(&mask);
        frame.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.get_mut().write_all(&frame).await.unwrap();
    }

    /// The next text message (fragments joined; pings answered).
    async fn recv(&mut self) -> String {
        let mut message = Vec::new();
        loop {
            let mut head = [0u8; 2];
            self.stream
                .read_exact(&mut head)
                .await
                .expect("the browser closed the connection");
            let fin = head[0] & 0x80 != 0;
            let opcode = head[0] & 0x0f;
            let masked = head[1] & 0x80 != 0;
            let len = match head[1] & 0x7f {
                126 => u64::from(self.stream.read_u16().await.unwrap()),
                127 => self.stream.read_u64().await.unwrap(),
                n => u64::from(n),
            };
            let mut mask = [0u8; 4];
            if masked {
                self.stream.read_exact(&mut mask).await.unwrap();
            }
            let mut payload = vec![0u8; usize::try_from(len).expect("frame size")];
            self.stream.read_exact(&mut payload).await.unwrap();
            if masked {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            match opcode {
                0x9 => {
                    // Ping: answer with a pong carrying the same data.
                    let mut frame = vec![0x8a, 0x80 | payload.len() as u8];
                    frame.extend_from_slice(&[0, 0, 0, 0]);
                    frame.extend_from_slice(&payload);
                    self.stream.get_mut().write_all(&frame).await.unwrap();
                }
                0x8 => panic!("the browser closed the DevTools connection"),
                0xA => {}
                _ => {
                    message.extend_from_slice(&payload);
                    if fin {
                        return String::from_utf8(message).expect("a UTF-8 text message");
                    }
                }
            }
        }
    }
}
