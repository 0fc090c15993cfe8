//! Errors shared by every celeriac crate.
//!
//! Drivers wrap their own error types into [`Error`] with an [`ErrorKind`] so that callers (a
//! reconnect loop, the CLI) can decide what to do without naming a driver crate.

use std::fmt;

/// A boxed error cause: what an [`Error`] reports as its [`std::error::Error::source`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with celeriac's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The configuration or a URL is invalid.
    Config,
    /// A message or stored record could not be encoded or decoded.
    Protocol,
    /// The broker failed (connection, storage, a refused operation).
    Broker,
    /// The result backend failed.
    Backend,
    /// The task name is not registered.
    UnknownTask,
    /// Waiting for something took longer than allowed.
    Timeout,
    /// The task finished in a failed state (FAILURE or REVOKED); see [`Error::remote`].
    TaskFailed,
    /// The driver or the component has been closed.
    Closed,
    /// The operation is not supported by this driver.
    Unsupported,
    /// An I/O error outside a driver.
    Io,
    /// A signed message was refused (unsigned, tampered, unknown or expired signer), or a
    /// message could not be signed; see [`crate::security`].
    Security,
    /// A unique task was sent while an equal call is pending, and its options ask for an
    /// error rather than the pending call's id; see [`crate::coord`].
    Duplicate,
}

/// The error type of celeriac's libraries.
///
/// Messages are lowercase and do not repeat their cause; walk [`std::error::Error::source`]
/// for the chain, or format with `{:#}` to print it: `message: cause: cause`.
pub struct Error {
    kind: ErrorKind,
    message: String,
    transient: bool,
    remote: Option<Box<crate::meta::RemoteError>>,
    source: Option<BoxError>,
}

impl Error {
    /// A new error of `kind` with a lowercase message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            transient: false,
            remote: None,
            source: None,
        }
    }

    /// Attaches the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Marks the error as transient: retrying the same operation later may succeed.
    #[must_use]
    pub fn transient(mut self) -> Self {
        self.transient = true;
        self
    }

    /// A configuration error.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    /// A protocol (encode/decode) error.
    pub fn protocol(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Protocol, message)
    }

    /// A broker error.
    pub fn broker(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Broker, message)
    }

    /// The broker error of an `extend_lease` too late: the lease ran out and the message may
    /// already be with another consumer.
    pub fn lease_expired() -> Self {
        Self::broker("lease already expired: the message was handed to another consumer")
    }

    /// A result backend error.
    pub fn backend(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Backend, message)
    }

    /// The component was closed.
    pub fn closed(what: &str) -> Self {
        Self::new(ErrorKind::Closed, format!("{what} is closed"))
    }

    /// A task finished in a failed state; carries the remote exception.
    pub fn task_failed(remote: crate::meta::RemoteError) -> Self {
        let message = format!("task failed: {}", remote.summary());
        Self {
            kind: ErrorKind::TaskFailed,
            message,
            transient: false,
            remote: Some(Box::new(remote)),
            source: None,
        }
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying the operation later may succeed (a lost connection, a locked database).
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// For [`ErrorKind::TaskFailed`]: the task's exception type, message and traceback.
    pub fn remote(&self) -> Option<&crate::meta::RemoteError> {
        self.remote.as_deref()
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if self.transient {
            d.field("transient", &true);
        }
        if let Some(remote) = &self.remote {
            d.field("remote", remote);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

/// The message; with `{:#}`, the message and then each cause of the chain, `: `-separated
/// (what a log line needs: the message alone hides why). A cause whose text the line already
/// ends with is left out: many libraries print their source inside their own message.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !f.alternate() {
            return f.write_str(&self.message);
        }
        let mut line = self.message.clone();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            let text = c.to_string();
            if !line.ends_with(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            cause = c.source();
        }
        f.write_str(&line)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::protocol("invalid json").with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_the_message_and_source_is_kept() {
        let io = std::io::Error::other("disk on fire");
        let e = Error::broker("cannot open queue file")
            .with_source(io)
            .transient();
        assert_eq!(e.to_string(), "cannot open queue file");
        assert_eq!(e.kind(), ErrorKind::Broker);
        assert!(e.is_transient());
        let src = std::error::Error::source(&e).expect("source");
        assert_eq!(src.to_string(), "disk on fire");
    }

    #[test]
    fn alternate_display_prints_the_cause_chain_once() {
        let inner = Error::broker("cannot commit").with_source(std::io::Error::other("disk full"));
        let e = Error::broker("cannot fetch").with_source(inner);
        assert_eq!(e.to_string(), "cannot fetch");
        assert_eq!(format!("{e:#}"), "cannot fetch: cannot commit: disk full");
        assert_eq!(format!("{:#}", Error::broker("alone")), "alone");
        // A library that prints its source in its own message is not repeated.
        #[derive(Debug)]
        struct Wraps(std::io::Error);
        impl fmt::Display for Wraps {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "io: {}", self.0)
            }
        }
        impl std::error::Error for Wraps {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = Error::broker("cannot connect").with_source(Wraps(refused));
        assert_eq!(format!("{e:#}"), "cannot connect: io: connection refused");
    }
}
