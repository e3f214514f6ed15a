//! One Surf session's work: a desktop sandbox (made, or the caller's), its display, live
//! view and Chromium up, then a breadth-first crawl of same-origin links to the asked
//! depth, driven over DevTools through Kiln's CDP route.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use kiln_api::desktop::{self, Resolution, ViewToken};
use kiln_api::NewSandbox;
use serde_json::Value;

use crate::session::{PageResult, Status};
use crate::target::Target;
use crate::Surf;

/// The desktop template's DevTools port (its `kiln.toml`'s `cdp_port`).
pub const CDP_PORT: u16 = 9222;
/// The template Surf's sandboxes come from.
pub const TEMPLATE: &str = "desktop";
/// The most pages one session visits.
pub const MAX_PAGES: usize = 30;
/// The most text kept per page.
const MAX_TEXT: usize = 20_000;
/// How long one page may take to load.
const PAGE_LOAD: Duration = Duration::from_secs(60);

/// Reads the page: its title, its text (when asked) and its same-origin links, without
/// fragments, each once, in document order.
const EXTRACT: &str = r#"(() => {
  const links = [];
  for (const a of document.querySelectorAll('a[href]')) {
    try {
      const u = new URL(a.getAttribute('href'), location.href);
      u.hash = '';
      if (u.origin === location.origin && (u.protocol === 'http:' || u.protocol === 'https:')
          && !links.includes(u.href)) links.push(u.href);
    } catch (e) {}
  }
  return {title: document.title, text: document.body ? document.body.innerText : '',
          links: links.slice(0, 200)};
})()"#;

/// Runs session `id` to its end and records how it ended.
pub(crate) async fn crawl(surf: Arc<Surf>, id: String) {
    let limit = surf.config.timeout;
    let outcome = tokio::time::timeout(limit, run(&surf, &id)).await;
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(format!(
            "the crawl did not finish within {} s (E2B_SURF_TIMEOUT)",
            limit.as_secs()
        )),
    };
    if let Some(e) = &error {
        tracing::warn!(session = %id, error = %e, "surf session failed");
    }
    surf.sessions.update(&id, |s| {
        s.status = if error.is_some() {
            Status::Failed
        } else {
            Status::Completed
        };
        s.error = error;
        s.finished_at = Some(chrono::Utc::now());
    });
}

async fn run(surf: &Surf, id: &str) -> Result<(), String> {
    let Some(session) = surf.sessions.get(id) else {
        return Ok(());
    };
    let client = &surf.client;
    let lifetime = i64::try_from(surf.config.sandbox_lifetime.as_secs()).unwrap_or(i64::MAX);
    let sandbox = match &session.sandbox_id {
        Some(sid) => client
            .connect(sid, lifetime)
            .await
            .map_err(|e| format!("connecting to sandbox {sid}: {e}"))?,
        None => {
            let req = NewSandbox {
                template_id: TEMPLATE.into(),
                timeout: Some(lifetime),
                secure: Some(true),
                metadata: Some(BTreeMap::from([(
                    "kiln.surf.session".to_string(),
                    id.to_string(),
                )])),
                env_vars: Some(BTreeMap::from([(
                    "DISPLAY".to_string(),
                    desktop::DISPLAY.to_string(),
                )])),
                ..NewSandbox::default()
            };
            let made = client
                .create(&req)
                .await
                .map_err(|e| format!("creating a {TEMPLATE} sandbox: {e}"))?;
            surf.sessions.update(id, |s| {
                s.sandbox_id = Some(made.sandbox_id.clone());
                s.owns_sandbox = true;
            });
            made
        }
    };
    let target = Target {
        client,
        id: sandbox.sandbox_id.clone(),
        token: sandbox.envd_access_token.clone(),
    };
    bring_up_desktop(&target, surf.config.resolution).await?;
    let mut vnc_url = bring_up_stream(&target, surf).await?;
    // What the live view wants from a browser (the server's live_view gate).
    let view_token = match &sandbox.traffic_access_token {
        Some(t) => t.parse::<ViewToken>().ok(),
        None => surf.config.view_token.clone(),
    };
    if let Some(token) = view_token {
        vnc_url = token.add_to(&vnc_url);
    }
    surf.sessions.update(id, |s| s.vnc_url = Some(vnc_url));
    bring_up_chromium(&target).await?;

    let mut cdp = client
        .devtools_page(&target.id, CDP_PORT)
        .await
        .map_err(|e| format!("reaching Chromium's DevTools in sandbox {}: {e}", target.id))?;
    if let Some(task) = &session.task {
        if !session.url.is_empty() {
            cdp.navigate(&session.url, PAGE_LOAD)
                .await
                .map_err(|e| e.to_string())?;
        }
        surf.sessions.update(id, |s| s.status = Status::Acting);
        let words = crate::agent::run(surf, id, &target, task, surf.config.resolution).await?;
        surf.sessions.update(id, |s| s.answer = Some(words));
        return Ok(());
    }
    surf.sessions.update(id, |s| s.status = Status::Crawling);

    let mut queue = VecDeque::from([(session.url.clone(), 0u32)]);
    let mut seen = HashSet::from([session.url.clone()]);
    let mut visited = 0;
    while let Some((url, depth)) = queue.pop_front() {
        if visited == MAX_PAGES {
            break;
        }
        visited += 1;
        let page = visit(&mut cdp, &url, depth, session.extract_content).await;
        if depth < session.depth {
            for link in &page.links {
                if seen.insert(link.clone()) {
                    queue.push_back((link.clone(), depth + 1));
                }
            }
        }
        surf.sessions.update(id, |s| s.pages.push(page));
    }
    Ok(())
}

/// One page: loaded, read and photographed. A page that fails is recorded with its
/// error; the crawl goes on.
async fn visit(cdp: &mut kiln_client::Cdp, url: &str, depth: u32, with_text: bool) -> PageResult {
    let mut page = PageResult {
        url: url.to_string(),
        depth,
        ..PageResult::default()
    };
    if let Err(e) = cdp.navigate(url, PAGE_LOAD).await {
        page.error = Some(e.to_string());
        return page;
    }
    match cdp.evaluate(EXTRACT).await {
        Ok(v) => {
            page.title = v["title"].as_str().unwrap_or_default().to_string();
            if with_text {
                let text: String = v["text"]
                    .as_str()
                    .unwrap_or_default()
                    .chars()
                    .take(MAX_TEXT)
                    .collect();
                page.content = Some(text);
            }
            page.links = same_origin_links(url, &v["links"]);
        }
        Err(e) => page.error = Some(e.to_string()),
    }
    match cdp.screenshot().await {
        Ok(png) => page.screenshot = Some(Arc::new(png)),
        Err(e) => {
            page.error.get_or_insert(e.to_string());
        }
    }
    page
}

/// The links EXTRACT reported that are http(s) and of `url`'s origin, at most 200. The
/// page's own scripts run beside EXTRACT and can change what it returns, so the host
/// checks again: a `javascript:` link would otherwise become a link on Surf's page.
fn same_origin_links(url: &str, reported: &Value) -> Vec<String> {
    let Ok(base) = reqwest::Url::parse(url) else {
        return Vec::new();
    };
    let mut links: Vec<String> = Vec::new();
    for link in reported.as_array().into_iter().flatten() {
        let Some(parsed) = link.as_str().and_then(|l| reqwest::Url::parse(l).ok()) else {
            continue;
        };
        let web = matches!(parsed.scheme(), "http" | "https");
        if web && parsed.origin() == base.origin() && !links.contains(&parsed.to_string()) {
            links.push(parsed.to_string());
        }
        if links.len() == 200 {
            break;
        }
    }
    links
}

/// Xvfb and XFCE, as e2b-desktop's create starts them, unless a display is up.
async fn bring_up_desktop(t: &Target<'_>, resolution: Resolution) -> Result<(), String> {
    if t.run(desktop::DISPLAY_UP).await? == 0 {
        return Ok(());
    }
    t.start(&resolution.xvfb_command()).await?;
    t.until(desktop::DISPLAY_UP, Duration::from_secs(30), "Xvfb")
        .await?;
    t.start(desktop::START_XFCE).await?;
    t.until(
        "pgrep -x xfwm4 >/dev/null",
        Duration::from_secs(120),
        "XFCE",
    )
    .await
}

/// The live view (x11vnc with a fresh password, noVNC on 6080), unless one runs (then
/// its password is not Surf's to know, and the URL carries none); its URL.
async fn bring_up_stream(t: &Target<'_>, surf: &Surf) -> Result<String, String> {
    let mut query = "autoconnect=true&resize=scale".to_string();
    if t.run(desktop::STREAM_UP).await? != 0 {
        let password: String = uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .chars()
            .take(16)
            .collect();
        let code = t.run(&desktop::start_x11vnc(&password)).await?;
        if code != 0 {
            return Err(format!(
                "x11vnc did not start in sandbox {} (exit {code})",
                t.id
            ));
        }
        t.start(desktop::START_NOVNC).await?;
        t.until(desktop::STREAM_UP, Duration::from_secs(60), "noVNC")
            .await?;
        query.push_str(&format!("&password={password}"));
    }
    Ok(format!(
        "{}/vnc.html?{query}",
        surf.config.sandbox_origin(&t.id, 6080)
    ))
}

/// Chromium with its DevTools port (the template's flags open it), unless it answers.
async fn bring_up_chromium(t: &Target<'_>) -> Result<(), String> {
    let answers = format!("curl -sf -o /dev/null 127.0.0.1:{CDP_PORT}/json/version");
    if t.run(&answers).await? == 0 {
        return Ok(());
    }
    t.start("chromium --new-window about:blank >/tmp/kiln-surf-chromium.log 2>&1")
        .await?;
    t.until(&answers, Duration::from_secs(180), "Chromium's DevTools")
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_web_links_of_the_pages_origin_are_kept() {
        let reported = serde_json::json!([
            "http://a.test/x",
            "javascript:alert(1)",
            "http://b.test/y",
            "https://a.test/z",
            "http://a.test/x",
            42,
            "data:text/html,hi",
            "http://a.test:8080/p",
            "http://a.test/q?r=1"
        ]);
        assert_eq!(
            same_origin_links("http://a.test/", &reported),
            ["http://a.test/x", "http://a.test/q?r=1"]
        );
        assert!(same_origin_links("not a url", &reported).is_empty());
    }
}
