//! An error with its whole cause chain, for logs and messages. A leaf module: the
//! contexts log with it, and the HTTP errors (which wrap the contexts' errors) build
//! their messages with it.

/// The whole `source()` chain of an error, for logs and messages.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
