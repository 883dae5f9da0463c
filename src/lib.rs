//! deptsync keeps an SQL copy of the departments held in several SaaS APIs, incrementally.
//!
//! - [`config`]: the config file, parsed then validated before any I/O; each source's
//!   table is handed to its kind.
//! - [`sources`]: one connector per vendor, each owning its config, behind the
//!   [`sources::WindowedSource`] or [`sources::ListingSource`] trait.
//! - [`store`]: where departments and positions are kept, behind [`store::Store`].
//! - [`engine`]: one pass of one source: plan, fetch, commit each page with its checkpoint.
//! - [`model`]: the words every module shares.
//! - [`app`]: the configured sources made ready once, and passes of them run and
//!   reported, for `sync`, the demo and the service alike.
//! - [`cli`]: the subcommands.
//! - [`report`]: what a person reads: the pass table and `status`.
//! - `demo` and `fakes` (feature `demo`, on by default): `deptsync demo`, and the simulated
//!   vendor APIs it syncs from, which the tests and the benchmark use too.

// A pass is one deep future (the engine's, under its lease's renewal), and the commands
// nest it further: the compiler's default depth for laying it out is too shallow.
#![recursion_limit = "256"]

pub mod app;
pub mod cli;
pub mod config;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod engine;
#[cfg(feature = "demo")]
pub mod fakes;
pub mod metrics;
pub mod model;
pub mod progress;
pub mod report;
pub mod sources;
pub mod store;

/// The validated configuration: the config file's settings, each source's validated by
/// its kind ([`sources::SourceSettings`]).
pub type Settings = config::Settings<sources::SourceSettings>;

/// An error and all its causes on one line, `outer: inner: innermost`: what logs and
/// `sync_runs.error` keep of a failure. The causes quote vendors (their error messages),
/// so the line is [`printable`].
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    printable(&cause_chain(error)).into_owned()
}

/// An error and its causes, `outer: inner: innermost`, each said once: a cause whose
/// text its error already shows (many libraries print their source in their own
/// message) is not repeated.
pub fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let said = inner.to_string();
        // Libraries that show their cause put it at the end of their own message.
        if !text.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = inner.source();
    }
    text
}

/// `text` from outside (a vendor's message, a department's id, a cursor) made safe to
/// show on a terminal or in a log line: control characters (an escape sequence could
/// rewrite an operator's terminal, a newline forge a journald line) and the characters
/// that reorder text (right-to-left overrides) are written as escapes, `\n`, `\u{1b}`.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    std::borrow::Cow::Owned(escaped)
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn vendor_text_cannot_drive_a_terminal_or_forge_a_log_line() {
        assert_eq!(
            printable("Sales & Marketing – Oslo"),
            "Sales & Marketing – Oslo"
        );
        assert_eq!(
            printable("a\u{1b}[2Jb\nFORGED\r\t\u{7f}\u{9b}"),
            "a\\u{1b}[2Jb\\nFORGED\\r\\t\\u{7f}\\u{9b}"
        );
        assert_eq!(printable("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(printable("a\u{2028}b"), "a\\u{2028}b", "a line separator");
        assert!(!printable("\u{0}\u{7}\u{8}").chars().any(char::is_control));
    }
}
