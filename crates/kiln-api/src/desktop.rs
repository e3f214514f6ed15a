//! How Kiln starts a desktop itself (the MCP server's desktop tools, NATS desktop
//! requests), as e2b-desktop's `Sandbox.create` does: Xvfb on `:0` at a resolution the
//! operator chooses (`E2B_DESKTOP_RESOLUTION`), then XFCE.

use std::fmt;
use std::str::FromStr;

/// The X display Kiln's desktops use (as the SDK's default).
pub const DISPLAY: &str = ":0";

/// Exits 0 once the display answers.
pub const DISPLAY_UP: &str = "xdpyinfo -display :0 >/dev/null 2>&1";
/// The XFCE session, in the background (as the SDK's `startxfce4`).
pub const START_XFCE: &str = "startxfce4";
/// Exits 0 once the live view's noVNC listens on 6080.
pub const STREAM_UP: &str = "netstat -tuln | grep -q ':6080 '";
/// noVNC on 6080 in front of x11vnc, where the SDK runs it (in the background).
pub const START_NOVNC: &str = "cd /opt/noVNC/utils && ./novnc_proxy --vnc localhost:5900 \
     --listen 6080 --web /opt/noVNC > /tmp/novnc.log 2>&1";

/// x11vnc on 5900 with VNC password `password` (as the SDK's `stream.start(require_auth
/// =True)`); returns once it runs in the background. `password` must be alphanumeric.
pub fn start_x11vnc(password: &str) -> String {
    debug_assert!(password.bytes().all(|b| b.is_ascii_alphanumeric()));
    format!(
        "mkdir -p ~/.vnc && x11vnc -storepasswd {password} ~/.vnc/passwd >/dev/null 2>&1 && \
         x11vnc -bg -display {DISPLAY} -forever -wait 50 -shared -rfbport 5900 -usepw \
         2>/tmp/x11vnc_stderr.log"
    )
}

/// Types `$KILN_TEXT` (set it in the command's environment: never shell text).
pub const TYPE_TEXT: &str = "xdotool type --delay 12 -- \"$KILN_TEXT\"";
/// Presses the chord in `$KILN_KEYS` (checked with [`valid_keys`]).
pub const PRESS_KEYS: &str = "xdotool key -- \"$KILN_KEYS\"";

/// A pointer button as xdotool numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Button {
    Left = 1,
    Middle = 2,
    Right = 3,
    WheelUp = 4,
    WheelDown = 5,
}

/// Moves the pointer to (`x`, `y`) and clicks `button` `times` times.
pub fn click(x: u32, y: u32, button: Button, times: u32) -> String {
    let repeat = if times > 1 {
        format!("--repeat {times} ")
    } else {
        String::new()
    };
    format!(
        "xdotool mousemove --sync {x} {y} click {repeat}{}",
        button as u8
    )
}

/// A PNG of the whole screen, with the pointer, at `path`.
pub fn screenshot(path: &str) -> String {
    format!("scrot --pointer --overwrite {path}")
}

/// Whether `keys` is X key names joined by `+` (`Return`, `ctrl+c`), nothing a shell or
/// xdotool would read as more.
pub fn valid_keys(keys: &str) -> bool {
    !keys.is_empty()
        && keys.len() <= 100
        && keys
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+_-".contains(&b))
}

/// A screen size, `WIDTHxHEIGHT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    pub width: u32,
    pub height: u32,
}

impl Resolution {
    /// The smallest and largest side Kiln accepts, in pixels: below it XFCE's panel
    /// does not fit; above it a 24-bit frame buffer passes 100 MB.
    pub const SIDES: std::ops::RangeInclusive<u32> = 240..=5120;

    /// The Xvfb command line for this size, the SDK's flags otherwise.
    pub fn xvfb_command(&self) -> String {
        format!(
            "Xvfb {DISPLAY} -ac -screen 0 {}x{}x24 -retro -dpi 96 -nolisten tcp -nolisten unix",
            self.width, self.height
        )
    }
}

impl Default for Resolution {
    /// The SDK's default.
    fn default() -> Self {
        Resolution {
            width: 1024,
            height: 768,
        }
    }
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl FromStr for Resolution {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "a desktop resolution is WIDTHxHEIGHT in pixels, each {}-{} (e.g. 1280x800); got {s:?}",
                Self::SIDES.start(),
                Self::SIDES.end()
            )
        };
        let (w, h) = s.trim().split_once(['x', 'X']).ok_or_else(bad)?;
        let side = |v: &str| {
            v.parse::<u32>()
                .ok()
                .filter(|n| Self::SIDES.contains(n))
                .ok_or_else(bad)
        };
        Ok(Resolution {
            width: side(w)?,
            height: side(h)?,
        })
    }
}

/// The query parameter that brings a live view's token in a URL a browser opens
/// (`https://6080-{id}.{domain}/vnc.html?...&kiln_token=...`).
pub const VIEW_TOKEN_QUERY: &str = "kiln_token";

/// The operator's token for desktops' live views (`E2B_DESKTOP_AUTH_TOKEN`): long
/// enough not to be guessed, and made only of characters that go into a URL's query
/// and a cookie as they are.
#[derive(Clone, PartialEq, Eq)]
pub struct ViewToken(String);

impl ViewToken {
    /// The fewest characters a token may have.
    pub const MIN_LEN: usize = 16;

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `url` (a live view's page URL, with a query) with the token added.
    pub fn add_to(&self, url: &str) -> String {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}{VIEW_TOKEN_QUERY}={}", self.0)
    }
}

impl fmt::Debug for ViewToken {
    /// Never the token itself (configs are logged).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ViewToken(..)")
    }
}

impl FromStr for ViewToken {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let fits = s.len() >= Self::MIN_LEN
            && s.len() <= 256
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        if fits {
            Ok(ViewToken(s.to_string()))
        } else {
            Err(format!(
                "E2B_DESKTOP_AUTH_TOKEN must be {}-256 characters of A-Z, a-z, 0-9 and -._~ \
                 (e.g. from `openssl rand -hex 24`); got {} characters",
                Self::MIN_LEN,
                s.len()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolutions_parse_within_bounds() {
        assert_eq!(
            "1280x800".parse::<Resolution>().unwrap(),
            Resolution {
                width: 1280,
                height: 800
            }
        );
        assert_eq!(
            Resolution::default().xvfb_command(),
            "Xvfb :0 -ac -screen 0 1024x768x24 -retro -dpi 96 -nolisten tcp -nolisten unix"
        );
        for bad in [
            "",
            "1024",
            "1024x",
            "x768",
            "0x0",
            "100x100",
            "99999x768",
            "1024x768x24",
            "-1x5",
        ] {
            let err = bad.parse::<Resolution>().unwrap_err();
            assert!(err.contains("WIDTHxHEIGHT"), "{bad}: {err}");
        }
    }

    #[test]
    fn view_tokens_are_long_and_url_safe_and_never_printed() {
        let t: ViewToken = "0123456789abcdef-._~".parse().unwrap();
        assert_eq!(
            t.add_to("https://6080-x.localhost/vnc.html?autoconnect=true"),
            "https://6080-x.localhost/vnc.html?autoconnect=true&kiln_token=0123456789abcdef-._~"
        );
        assert_eq!(
            t.add_to("/vnc.html"),
            "/vnc.html?kiln_token=0123456789abcdef-._~"
        );
        assert_eq!(format!("{t:?}"), "ViewToken(..)");
        for bad in [
            "",
            "short",
            "0123456789abcdef;x",
            "0123456789 abcdef",
            "0123456789abcdéf",
        ] {
            let err = bad.parse::<ViewToken>().unwrap_err();
            assert!(err.contains("E2B_DESKTOP_AUTH_TOKEN"), "{bad}: {err}");
            assert!(
                !err.contains(bad) || bad.is_empty(),
                "the error repeats the token: {err}"
            );
        }
    }
}
