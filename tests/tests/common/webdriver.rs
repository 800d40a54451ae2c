//! A minimal W3C WebDriver client for headless Chromium: starts `/usr/bin/chromedriver` on a
//! free loopback port, opens one session with a fresh profile, and speaks the WebDriver
//! HTTP/1.1 JSON protocol over a plain `TcpStream` (one connection per command). Only the
//! commands the page tests use. Dropping the driver deletes the session (which closes the
//! browser), then kills chromedriver and, if it is still there, the browser.

use std::{
    fmt,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The key under which WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// True when Chromium and chromedriver are installed (`cargo xtask setup` installs them); on a
/// developer machine their absence skips the test with a note, under `CI=true` it fails.
pub fn require_chromium(test: &str) -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if super::in_ci() {
        panic!("{test}: {missing:?} missing (cargo xtask setup) and CI=true forbids skipping");
    }
    eprintln!("SKIPPED {test}: {missing:?} missing (cargo xtask setup installs them)");
    false
}

/// A WebDriver error answer (or a transport failure, with status 0).
#[derive(Debug)]
pub struct Error {
    pub status: u16,
    pub error: String,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.error, self.message)
    }
}

fn transport(what: impl fmt::Display) -> Error {
    Error {
        status: 0,
        error: "transport".to_owned(),
        message: what.to_string(),
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// An element reference, valid until its document goes away.
#[derive(Clone, Debug)]
pub struct Element(String);

impl Element {
    fn json(&self) -> Value {
        json!({ ELEMENT: self.0 })
    }
}

/// chromedriver with one open session.
pub struct WebDriver {
    driver: Child,
    port: u16,
    session: String,
    browser_pid: Option<u32>,
}

impl WebDriver {
    /// Starts chromedriver (its log goes to `dir/chromedriver.log`) and a headless Chromium
    /// whose profile is a fresh directory under `dir`.
    pub fn start(dir: &Path) -> Self {
        let port = super::free_port();
        let log = std::fs::File::create(dir.join("chromedriver.log")).unwrap();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start chromedriver");
        let mut wd = Self {
            driver,
            port,
            session: String::new(),
            browser_pid: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !wd
            .request("GET", "/status", None)
            .is_ok_and(|v| v["ready"] == true)
        {
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready within 30 s; log: {}",
                dir.join("chromedriver.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile).unwrap();
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let session = wd
            .request("POST", "/session", Some(&capabilities))
            .unwrap_or_else(|e| panic!("new WebDriver session: {e}"));
        wd.session = session["sessionId"].as_str().expect("sessionId").to_owned();
        wd.browser_pid = session["capabilities"]["goog:processID"]
            .as_u64()
            .map(|p| p as u32);
        wd
    }

    /// One command; the answer's `value`, or the WebDriver error it carries.
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).map_err(transport)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(transport)?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
             Content-Type: application/json; charset=utf-8\r\nContent-Length: {len}\r\n\r\n{body}",
            port = self.port,
            len = body.len(),
        )
        .map_err(transport)?;
        // chromedriver answers `Connection: close` but may keep the connection open: the
        // answer ends where its Content-Length (or last chunk) says, not at EOF.
        let mut answer = Vec::new();
        let mut buf = [0; 64 * 1024];
        let (status, payload) = loop {
            if let Some(done) = complete(&answer)? {
                break done;
            }
            let n = stream.read(&mut buf).map_err(transport)?;
            if n == 0 {
                return Err(transport(format!(
                    "connection closed mid-answer: {}",
                    String::from_utf8_lossy(&answer)
                )));
            }
            answer.extend_from_slice(&buf[..n]);
        };
        let json: Value = serde_json::from_slice(&payload).map_err(|e| {
            transport(format!(
                "{status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&payload)
            ))
        })?;
        let value = json["value"].clone();
        if status == 200 {
            Ok(value)
        } else {
            Err(Error {
                status,
                error: value["error"].as_str().unwrap_or("?").to_owned(),
                message: value["message"].as_str().unwrap_or("").to_owned(),
            })
        }
    }

    fn session_request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let path = format!("/session/{}{path}", self.session);
        self.request(method, &path, body)
    }

    pub fn navigate(&self, url: &str) -> Result<()> {
        self.session_request("POST", "/url", Some(&json!({ "url": url })))
            .map(drop)
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the current frame.
    pub fn execute(&self, script: &str, args: &[Value]) -> Result<Value> {
        self.session_request(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// The first element matching a CSS selector in the current frame.
    pub fn find(&self, css: &str) -> Result<Element> {
        let found = self.session_request(
            "POST",
            "/element",
            Some(&json!({ "using": "css selector", "value": css })),
        )?;
        found[ELEMENT]
            .as_str()
            .map(|id| Element(id.to_owned()))
            .ok_or_else(|| transport(format!("no element reference in {found}")))
    }

    fn element_request(
        &self,
        method: &str,
        el: &Element,
        what: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        self.session_request(method, &format!("/element/{}{what}", el.0), body)
    }

    pub fn click(&self, el: &Element) -> Result<()> {
        self.element_request("POST", el, "/click", Some(&json!({})))
            .map(drop)
    }

    /// Types `text` into the element, as key presses (input events fire).
    pub fn send_keys(&self, el: &Element, text: &str) -> Result<()> {
        self.element_request("POST", el, "/value", Some(&json!({ "text": text })))
            .map(drop)
    }

    pub fn text(&self, el: &Element) -> Result<String> {
        let v = self.element_request("GET", el, "/text", None)?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// A DOM property of the element (`value` of an input, say); null if it has none.
    pub fn property(&self, el: &Element, name: &str) -> Result<Value> {
        self.element_request("GET", el, &format!("/property/{name}"), None)
    }

    pub fn is_displayed(&self, el: &Element) -> Result<bool> {
        let v = self.element_request("GET", el, "/displayed", None)?;
        v.as_bool()
            .ok_or_else(|| transport(format!("displayed: {v}")))
    }

    /// Makes the document in `frame` (an iframe element) the current browsing context.
    pub fn switch_to_frame(&self, frame: &Element) -> Result<()> {
        self.session_request("POST", "/frame", Some(&json!({ "id": frame.json() })))
            .map(drop)
    }

    /// Back to the page's top-level document.
    pub fn switch_to_top(&self) -> Result<()> {
        self.session_request("POST", "/frame", Some(&json!({ "id": null })))
            .map(drop)
    }

    /// The current frame's document, serialized.
    pub fn source(&self) -> Result<String> {
        let v = self.session_request("GET", "/source", None)?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// Resizes the browser window (the viewport a screenshot shows follows it).
    pub fn set_window_size(&self, width: u32, height: u32) -> Result<()> {
        let rect = json!({ "width": width, "height": height });
        self.session_request("POST", "/window/rect", Some(&rect))
            .map(drop)
    }

    /// A PNG of the top-level browsing context's viewport.
    pub fn screenshot(&self) -> Result<Vec<u8>> {
        let v = self.session_request("GET", "/screenshot", None)?;
        use base64::Engine as _;
        v.as_str()
            .and_then(|text| base64::engine::general_purpose::STANDARD.decode(text).ok())
            .ok_or_else(|| transport("screenshot: not a base64 string"))
    }
}

/// The status and body of `answer`, once it holds a whole HTTP response; `None` while more
/// is to come.
fn complete(answer: &[u8]) -> Result<Option<(u16, Vec<u8>)>> {
    let Some(split) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
    let body = &answer[split + 4..];
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| transport(format!("bad status line: {head}")))?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
    };
    if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| transport(format!("bad content-length: {head}")))?;
        return Ok((body.len() >= len).then(|| (status, body[..len].to_vec())));
    }
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return Ok(dechunk(body).map(|b| (status, b)));
    }
    Err(transport(format!("answer without a length: {head}")))
}

/// Decodes a `Transfer-Encoding: chunked` body; `None` until its last chunk is there.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

impl Drop for WebDriver {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.session_request("DELETE", "", None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // DELETE closes the browser; if it did not (chromedriver hung, say), kill it, after
        // making sure the pid still names a Chromium process.
        if let Some(pid) = self.browser_pid {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim().starts_with("chrom") {
                // SAFETY: plain kill(2); the pid was checked to be Chromium just above.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}
