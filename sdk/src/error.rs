//! The SDK's error type: a message plus, for configuration errors, the offending key.

use std::fmt;

/// An error raised inside a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
    config_key: Option<String>,
}

/// Result with the SDK's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(message: impl Into<String>) -> Self {
        Error { message: message.into(), config_key: None }
    }

    /// An error about the key `key` of the plugin's config section.
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error { message: message.into(), config_key: Some(key.into()) }
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn config_key(&self) -> Option<&str> {
        self.config_key.as_deref()
    }

    /// Prefix the message with context.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// The message of a caught panic payload (a `&str` or `String`, as `panic!` makes them).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Build an [`Error`] from a format string and return it.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::Error::new(format!($($arg)*))) };
}
