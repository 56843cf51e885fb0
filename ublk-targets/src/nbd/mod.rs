//! The NBD target: a network block device client serving a ublk device.
//!
//! * [`proto`]: the wire protocol, pure encode/decode (no IO), fuzz-tested.
//! * [`uri`]: `nbd[s]://HOST[:PORT]/EXPORT`, `nbd[s]+unix:///EXPORT?socket=PATH` and
//!   `nbd[s]+vsock://CID[:PORT]/EXPORT`.
//! * [`conn`]: connecting, negotiating (GO / EXPORT_NAME), listing exports.
//! * [`tls`]: `NBD_OPT_STARTTLS` with rustls (X.509), a TLS stream for two threads, and the
//!   hand-over of a session to the kernel (kTLS).
//! * [`client`]: the pipelined transmission engine with reconnect and timeouts.
//! * [`ring`]: the io_uring engine, one connection per queue driven by the queue thread, on
//!   top of `session` (its requests and reply parser, without IO).
//! * [`target`]: [`NbdTarget`], the ublk [`Target`](ublk_core::Target), and the engine choice.
//! * [`NbdError`]: everything that can go wrong, with an [`errno`](NbdError::errno) mapping.

pub mod client;
pub mod conn;
mod error;
pub mod proto;
pub mod ring;
mod session;
pub mod target;
pub mod tls;
pub mod uri;

pub use client::{Client, ClientOptions, Cmd, Completion, Request};
pub use conn::{list_exports, probe_export, ConnectOptions, ExportEntry, ExportInfo, Ktls};
pub use error::{NbdError, ProtoError, Result};
pub use target::{Engine, NbdConfig, NbdQueue, NbdTarget};
pub use tls::TlsConfig;
pub use uri::{NbdAddr, NbdUri, TlsParams};
