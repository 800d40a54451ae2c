//! The agent's flame graph page (`/`) in a real browser: headless Chromium driven through
//! chromedriver (common/webdriver.rs), against `profiler-agent run` sampling two C fixtures.
//!
//! Checked: the service list fills in as intervals are collected (the page reloads itself
//! every interval); clicking a service loads its flame graph into the page's iframe, and that
//! graph, read inside the frame, is titled with the service and holds the fixture's
//! functions and not the other service's; typing into the filter box hides the services it
//! does not match, and the filter still holds after the page's next reload.
//!
//! Once spin's graph is drawn (its boxes labelled), the test takes a screenshot of the page
//! in a 1280x800 window, writes it to its temp dir (the path is printed) and checks it is a
//! PNG of at least 600x300. With `UPDATE_SCREENSHOT=PATH` it also copies the PNG to PATH (a
//! relative PATH is taken from `tests/`, the test's working directory): run
//! `UPDATE_SCREENSHOT=$PWD/docs/page.png cargo test -p profiler-tests --test page` from the
//! workspace root to refresh the README's `docs/page.png`.
//!
//! The page reloads every collect interval (2 s here), so element references and the frame
//! can go stale between two commands: every step is retried until it succeeds or a deadline
//! passes.
//!
//! Root is needed (BPF), and Chromium with chromedriver (`cargo xtask setup`); under
//! `CI=true` a missing prerequisite fails the test.

mod common;

use std::{net::TcpStream, time::Duration};

use common::{
    webdriver::{self, WebDriver},
    *,
};
use serde_json::Value;

const SHOW_UP: Duration = Duration::from_secs(30);
/// The window the screenshot is taken in, and the least size it must have.
const WINDOW: (u32, u32) = (1280, 800);
const MIN_SHOT: (u32, u32) = (600, 300);

/// The width and height in a PNG's IHDR chunk, if `png` starts like a PNG.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    let ihdr = png.strip_prefix(SIGNATURE)?;
    // Length (4 bytes), "IHDR", then width and height, big-endian.
    if ihdr.get(4..8)? != b"IHDR" {
        return None;
    }
    let be = |at: usize| Some(u32::from_be_bytes(ihdr.get(at..at + 4)?.try_into().ok()?));
    Some((be(8)?, be(12)?))
}

/// Runs `step` until it gives `Some`, logging WebDriver errors (stale elements, a frame gone
/// with a reload) and retrying them; fails the test after `within`.
fn retry<T>(
    within: Duration,
    what: &str,
    mut step: impl FnMut() -> webdriver::Result<Option<T>>,
) -> T {
    let mut last = None;
    let deadline = std::time::Instant::now() + within;
    loop {
        match step() {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) => last = Some(e.to_string()),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}; last WebDriver error: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn flame_graph_page_in_headless_chromium_shows_the_workloads_functions() {
    const TEST: &str = "flame_graph_page_in_headless_chromium_shows_the_workloads_functions";
    if !require_root(TEST) || !webdriver::require_chromium(TEST) {
        return;
    }
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let spin = compile_c("spin", dir.path());
    let chain = compile_c("chain", dir.path());
    let spin = Workload::start(&spin, &["3600"]);
    // The other service only has to show up in the list: normal priority, one thread.
    let chain = Workload::spawn(&chain, &["3600"]);
    let agent = Agent::start(
        dir.path(),
        &format!(
            r#"
collect_interval = "2s"
[[targets]]
__process_pid__ = "{spin}"
service_name = "spin"
[[targets]]
__process_pid__ = "{chain}"
service_name = "chain"
[write]
directory = "{profiles}"
"#,
            spin = spin.pid(),
            chain = chain.pid(),
            profiles = dir.path().join("profiles").display(),
        ),
    );
    let port = agent.port;
    wait_until(SHOW_UP, "agent's server up", || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });

    eprintln!("{:.1?}: agent's server up", started.elapsed());
    let wd = WebDriver::start(dir.path());
    wd.set_window_size(WINDOW.0, WINDOW.1).unwrap();
    wd.navigate(&format!("http://127.0.0.1:{port}/")).unwrap();

    // Both services listed, once the page has reloaded after their first interval.
    let names = retry(SHOW_UP, "both services in the page's list", || {
        let names = wd.execute(
            "return Array.from(document.querySelectorAll('#services li'), l => l.dataset.name)",
            &[],
        )?;
        let names: Vec<String> = serde_json::from_value(names).unwrap_or_default();
        let both = ["spin", "chain"]
            .iter()
            .all(|s| names.iter().any(|n| n == s));
        Ok(both.then_some(names))
    });
    eprintln!("{:.1?}: services listed: {names:?}", started.elapsed());

    // Select spin (the list is sorted, so the page starts on chain) and read its graph from
    // inside the iframe.
    retry(SHOW_UP, "click on spin", || {
        wd.switch_to_top()?;
        wd.click(&wd.find("#services li[data-name='spin'] a")?)?;
        Ok(Some(()))
    });
    let (title, svg) = retry(SHOW_UP, "spin's flame graph in the iframe", || {
        wd.switch_to_top()?;
        let frame = wd.find("iframe#graph")?;
        wd.switch_to_frame(&frame)?;
        let source = wd.source();
        let title = wd.find("#title").and_then(|t| wd.text(&t));
        wd.switch_to_top()?;
        let (source, title) = (source?, title?);
        Ok(source.contains("spin_inner").then_some((title, source)))
    });
    eprintln!("{:.1?}: spin's graph read in the frame", started.elapsed());
    assert_eq!(title, "spin", "graph title");
    for function in ["main", "spin_outer", "spin_inner"] {
        assert!(svg.contains(function), "{function} not in spin's graph");
    }
    assert!(
        !svg.contains("chain_d"),
        "the other service's function in spin's graph"
    );

    // Screenshot of spin's graph: once its boxes carry their labels (inferno's script fits
    // them to the boxes after load; each ends in a space), with no reload in between.
    let png = retry(SHOW_UP, "screenshot of spin's drawn graph", || {
        wd.switch_to_top()?;
        wd.execute("window.beforeShot = true", &[])?;
        wd.switch_to_frame(&wd.find("iframe#graph")?)?;
        let labels = wd.execute(
            "return Array.from(document.querySelectorAll('#frames text'), t => t.textContent)",
            &[],
        );
        wd.switch_to_top()?;
        let labels: Vec<String> = serde_json::from_value(labels?).unwrap_or_default();
        if !labels.iter().any(|l| l.trim() == "spin_inner") {
            return Ok(None);
        }
        let png = wd.screenshot()?;
        let same_page = wd.execute("return window.beforeShot === true", &[])?;
        Ok((same_page == Value::Bool(true)).then_some(png))
    });
    let shot = dir.path().join("page.png");
    std::fs::write(&shot, &png).unwrap();
    eprintln!("{:.1?}: screenshot: {}", started.elapsed(), shot.display());
    let (width, height) = png_size(&png).expect("the screenshot is not a PNG");
    eprintln!("screenshot {width}x{height}, {} bytes", png.len());
    assert!(
        width >= MIN_SHOT.0 && height >= MIN_SHOT.1,
        "screenshot {width}x{height}, less than {MIN_SHOT:?}"
    );
    if let Some(path) = std::env::var_os("UPDATE_SCREENSHOT").map(std::path::PathBuf::from) {
        std::fs::write(&path, &png).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
        eprintln!("screenshot copied to {}", path.display());
    }

    // The filter: "cha" matches chain only, so spin's entry is hidden and chain's is not.
    let displayed = |name: &str| -> webdriver::Result<bool> {
        wd.is_displayed(&wd.find(&format!("#services li[data-name='{name}']"))?)
    };
    retry(SHOW_UP, "filter hides spin", || {
        wd.switch_to_top()?;
        let filter = wd.find("#filter")?;
        if wd.property(&filter, "value")? != "cha" {
            wd.execute("document.getElementById('filter').value = ''", &[])?;
            wd.send_keys(&filter, "cha")?;
        }
        Ok((!displayed("spin")? && displayed("chain")?).then_some(()))
    });
    eprintln!("{:.1?}: filter applied", started.elapsed());
    // The page reloads every interval; the filter a user typed must survive it.
    wd.execute("window.beforeReload = true", &[]).unwrap();
    retry(SHOW_UP, "the page's next reload", || {
        let v = wd.execute("return window.beforeReload === true", &[])?;
        Ok((v == Value::Bool(false)).then_some(()))
    });
    retry(SHOW_UP, "filter still applied after a reload", || {
        let value = wd.property(&wd.find("#filter")?, "value")?;
        Ok((value == "cha" && !displayed("spin")? && displayed("chain")?).then_some(()))
    });
    eprintln!("{:.1?}: filter held across a reload", started.elapsed());
}
