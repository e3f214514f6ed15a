//! Kiln's TCP tunnel through envd (not part of E2B's protocol).
//!
//! The host reaches a TCP port inside the sandbox by sending, over envd's socket:
//!
//! ```text
//! GET /_kiln/tunnel/{port} HTTP/1.1
//! Connection: Upgrade
//! Upgrade: kiln-tunnel
//! ```
//!
//! envd connects to `127.0.0.1:{port}` (then `[::1]:{port}`). If that fails it answers
//! `502` with `{"code":502,"message":"port {port} is not open in the sandbox"}`;
//! otherwise `101 Switching Protocols` (`Upgrade: kiln-tunnel`), after which the
//! connection carries raw bytes both ways until either side closes.

/// Route prefix; append the decimal port.
pub const PATH_PREFIX: &str = "/_kiln/tunnel/";
/// Value of the `Upgrade` header, both ways.
pub const UPGRADE: &str = "kiln-tunnel";

/// The request path for `port`.
pub fn path(port: u16) -> String {
    format!("{PATH_PREFIX}{port}")
}

/// The 502 message when nothing listens on `port`.
pub fn port_closed_message(port: u16) -> String {
    format!("port {port} is not open in the sandbox")
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_for_port() {
        assert_eq!(super::path(8080), "/_kiln/tunnel/8080");
    }
}
