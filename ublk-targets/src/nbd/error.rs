//! The error type of the NBD client.

use std::io;

/// Errors of the NBD client: URI parsing, connecting, negotiating, and transmission.
///
/// Variants are kept in alphabetical order.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// The client was shut down.
    #[error("the NBD client is shut down")]
    Closed,
    /// Connecting to the server failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address (host:port or socket path).
        addr: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// After a reconnect, the server presents a different export.
    #[error("the export changed across a reconnect: {0}")]
    ExportChanged(String),
    /// The export's properties cannot be served (e.g. a minimum block size above 4 KiB).
    #[error("the export cannot be served: {0}")]
    ExportUnusable(String),
    /// The server did not answer the negotiation in time.
    #[error(
        "{addr} did not answer the NBD negotiation within {secs} s (a server that serves one \
         client at a time, such as qemu-nbd without --shared, may be busy with another)"
    )]
    HandshakeTimeout {
        /// The server address.
        addr: String,
        /// The limit, in seconds.
        secs: u64,
    },
    /// Reading from or writing to the server failed.
    #[error("NBD connection IO failed")]
    Io(#[source] io::Error),
    /// The TLS session could not be handed to the kernel after its keys were taken out of
    /// rustls: the session is lost.
    #[error("cannot hand the TLS session to the kernel: {0}")]
    KernelTls(String),
    /// Kernel TLS was required (`--ktls on`, or the io_uring engine's further connections)
    /// and is not possible.
    #[error("kernel TLS is required and not possible: {0}")]
    KernelTlsUnavailable(String),
    /// The server does not speak fixed newstyle negotiation.
    #[error("the server does not speak fixed newstyle NBD ({0})")]
    NotNewstyle(&'static str),
    /// The server refused an option (`NBD_REP_ERR_*`).
    #[error("the server refused {option} with {reply}{}", fmt_msg(.message))]
    OptionRefused {
        /// Option name.
        option: &'static str,
        /// Reply type name.
        reply: &'static str,
        /// The server's message, if any.
        message: String,
    },
    /// The server violated the protocol.
    #[error("NBD protocol violation: {0}")]
    Protocol(#[from] ProtoError),
    /// The server replied to a request with an NBD error value.
    #[error("the server failed the request with NBD error {0}")]
    Request(u32),
    /// A request did not complete in time.
    #[error("the request timed out")]
    Timeout,
    /// The server ended the TLS session right after the handshake.
    #[error("{addr} closed the TLS session during negotiation (did it reject the client certificate, or want one?)")]
    TlsClosed {
        /// The server address.
        addr: String,
        /// The IO error seen.
        #[source]
        source: io::Error,
    },
    /// TLS credentials could not be loaded.
    #[error("bad TLS credentials {}: {reason}", .path.display())]
    TlsCredentials {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS handshake failed (e.g. the server's certificate is not trusted).
    #[error("TLS handshake with {addr} failed")]
    TlsHandshake {
        /// The server address.
        addr: String,
        /// Cause (a rustls error inside an `io::Error`, or the socket's error).
        #[source]
        source: io::Error,
    },
    /// The name to check the server's certificate against is not a valid DNS name or address.
    #[error("invalid TLS host name {0:?}")]
    TlsHostname(String),
    /// The server refused `NBD_OPT_STARTTLS` while TLS was required.
    #[error("TLS is required but the server refused NBD_OPT_STARTTLS with {reply}{} (is TLS enabled on the server?)", fmt_msg(.message))]
    TlsRefused {
        /// Reply type name.
        reply: &'static str,
        /// The server's message, if any.
        message: String,
    },
    /// The server requires TLS and the client did not ask for it.
    #[error("the server requires TLS (refused {option} with NBD_REP_ERR_TLS_REQD): use nbds:// or --tls")]
    TlsRequired {
        /// The option refused.
        option: &'static str,
    },
    /// A TLS configuration rustls refuses.
    #[error("cannot set up TLS")]
    TlsSetup(#[source] rustls::Error),
    /// The URI is not a usable NBD URI.
    #[error("invalid NBD URI: {0}")]
    Uri(String),
}

fn fmt_msg(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

impl NbdError {
    /// The negative errno to complete a block request with.
    pub fn errno(&self) -> i32 {
        match self {
            NbdError::Request(e) => -super::proto::errno_of(*e),
            NbdError::Closed => -libc::ESHUTDOWN,
            _ => -libc::EIO,
        }
    }

    /// Whether the error is a transient connection problem that a reconnect may cure.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            NbdError::Io(_) | NbdError::Connect { .. } | NbdError::Protocol(_)
        )
    }
}

impl From<io::Error> for NbdError {
    fn from(e: io::Error) -> Self {
        NbdError::Io(e)
    }
}

/// A protocol violation found while decoding what the server sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A magic number is wrong.
    #[error("bad {what} magic {got:#x}")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// The value received.
        got: u64,
    },
    /// A length field is out of bounds.
    #[error("bad length {len} for {what}")]
    BadLength {
        /// What carried the length.
        what: &'static str,
        /// The length.
        len: u64,
    },
    /// A reply names a cookie with no request in flight.
    #[error("reply for unknown cookie {0:#x}")]
    UnknownCookie(u64),
    /// A structured reply chunk type is unknown and not an error type.
    #[error("unknown reply chunk type {0}")]
    UnknownChunk(u16),
    /// A reply does not fit the request it answers.
    #[error("{0}")]
    Mismatch(&'static str),
}

/// `Result` with [`NbdError`].
pub type Result<T, E = NbdError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_errno_mapping() {
        assert_eq!(NbdError::Request(1).errno(), -libc::EPERM);
        assert_eq!(NbdError::Request(28).errno(), -libc::ENOSPC);
        assert_eq!(NbdError::Request(95).errno(), -libc::EOPNOTSUPP);
        assert_eq!(NbdError::Request(12345).errno(), -libc::EINVAL);
        assert_eq!(NbdError::Timeout.errno(), -libc::EIO);
        assert_eq!(
            NbdError::TlsRequired {
                option: "NBD_OPT_GO"
            }
            .errno(),
            -libc::EIO
        );
        let m = NbdError::OptionRefused {
            option: "NBD_OPT_GO",
            reply: "NBD_REP_ERR_UNKNOWN",
            message: "no such export".into(),
        }
        .to_string();
        assert!(m.ends_with("NBD_REP_ERR_UNKNOWN: no such export"), "{m}");
    }
}
