//! How errors are written into the log: the whole chain on one line. A leaf module,
//! so every layer of the server can log without depending on the HTTP layer.

/// Render an error chain as one line: `outer: inner: root`.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
