//! TLS (`NBD_OPT_STARTTLS`) with rustls: loading X.509 credentials and a TLS stream that a
//! reader thread and a writer thread can use at the same time.
//!
//! A `rustls::ClientConnection` cannot be split into a read half and a write half, so
//! [`TlsStream`] keeps it behind a mutex that is **never held across a blocking socket call**:
//!
//! * the reader takes the lock, hands out decrypted data if there is any, and otherwise reads
//!   ciphertext from the socket *without* the lock, then feeds it in under the lock;
//! * the writer holds a second lock (`wlock`) for the whole of a write: it encrypts under the
//!   connection lock, then writes the records out without it, so records leave in order and the
//!   reader can decrypt meanwhile.
//!
//! When decrypting makes rustls queue output of its own (a `KeyUpdate` answer, an alert), the
//! reader sends it only if no write is in progress (`try_lock` on `wlock`, under the connection
//! lock); otherwise the writer, which checks for queued output under the connection lock before
//! it lets go of `wlock`, sends it. So nothing queued is forgotten and the reader never waits
//! for the writer. (The reader may block briefly sending such a small record itself if the
//! socket's send buffer is full; this only arises on a server-requested key update.)
//!
//! Once an export is negotiated on a TCP socket, the session is normally handed to the kernel
//! ([`TlsStream::into_kernel`], kTLS): rustls gives up its traffic keys and sequence numbers,
//! the socket gets the `tls` upper layer protocol, and from then on it carries plaintext for
//! this process while the kernel encrypts and decrypts the records. The io_uring engine can
//! then drive it like any plaintext socket. Where that is not possible (a Unix socket, no `tls`
//! module), the session stays here, in user space.
//!
//! The plaintext path does not go through this module at all.

use super::conn::Stream;
use super::error::{NbdError, Result};
use super::uri::{NbdAddr, TlsParams};
use nix::sys::socket::{setsockopt, sockopt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::RootCertStore;
use rustls::{ClientConfig, ClientConnection, ConnectionTrafficSecrets, ProtocolVersion};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

/// The CA bundle used when no certificate directory is given (Debian's `ca-certificates`).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A ready TLS client configuration: credentials and the name the server must prove.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

fn cred_err(path: &Path, reason: impl std::fmt::Display) -> NbdError {
    NbdError::TlsCredentials {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| cred_err(path, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| cred_err(path, e))?;
    if certs.is_empty() {
        return Err(cred_err(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

impl TlsConfig {
    /// Loads the credentials `params` names, for a server at `addr`.
    ///
    /// With a certificate directory (the qemu / nbdkit layout), `ca-cert.pem` is the trusted CA
    /// and `client-cert.pem` + `client-key.pem`, if present, authenticate the client. Without
    /// one, the system CA bundle ([`SYSTEM_CA_BUNDLE`]) is trusted. The server must present a
    /// certificate for `params.hostname`, else the TCP host, else (Unix sockets) `localhost`.
    pub fn new(params: &TlsParams, addr: &NbdAddr) -> Result<TlsConfig> {
        let ca_path = match &params.certificates {
            Some(dir) => dir.join("ca-cert.pem"),
            None => PathBuf::from(SYSTEM_CA_BUNDLE),
        };
        let mut roots = RootCertStore::empty();
        for c in load_certs(&ca_path)? {
            roots.add(c).map_err(|e| cred_err(&ca_path, e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(NbdError::TlsSetup)?
            .with_root_certificates(roots);
        let client_pair = params
            .certificates
            .as_ref()
            .map(|d| (d.join("client-cert.pem"), d.join("client-key.pem")));
        let mut config = match client_pair {
            Some((cert, key)) if cert.exists() || key.exists() => {
                if !key.exists() {
                    return Err(cred_err(&key, "missing (client-cert.pem needs its key)"));
                }
                let chain = load_certs(&cert)?;
                let key_der = PrivateKeyDer::from_pem_file(&key).map_err(|e| cred_err(&key, e))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(NbdError::TlsSetup)?
            }
            _ => builder.with_no_client_auth(),
        };
        // For kernel TLS (`TlsStream::into_kernel`).
        config.enable_secret_extraction = true;
        let name = match (&params.hostname, addr) {
            (Some(h), _) => h.clone(),
            (None, NbdAddr::Tcp { host, .. }) => host.clone(),
            (None, NbdAddr::Unix(_) | NbdAddr::Vsock { .. }) => "localhost".to_string(),
        };
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| NbdError::TlsHostname(name))?;
        Ok(TlsConfig {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// What [`TlsStream`]'s lock protects.
struct TlsState {
    conn: ClientConnection,
    /// Ciphertext read from the socket, `rx[rx_pos..rx_end]` not yet given to rustls. Taken
    /// out (empty) while the reader reads the socket without the lock.
    rx: Vec<u8>,
    rx_pos: usize,
    rx_end: usize,
    /// The socket reached end of file (and rustls was told).
    eof: bool,
    /// Scratch space for outgoing records.
    tx: Vec<u8>,
}

/// A TLS session over a connected socket, usable by one reader and one writer thread at once
/// (through `Read`/`Write` for `&TlsStream`).
pub struct TlsStream {
    sock: Stream,
    st: Mutex<TlsState>,
    /// Held for the whole of a write: records reach the socket in the order rustls made them.
    wlock: Mutex<()>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("sock", &self.sock)
            .finish_non_exhaustive()
    }
}

const RX_BUF: usize = 64 << 10;

fn tls_io_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Runs the TLS handshake on `sock` (right after the server acknowledged
    /// `NBD_OPT_STARTTLS`); `sock`'s timeouts bound it.
    pub fn handshake(sock: Stream, cfg: &TlsConfig, addr: &NbdAddr) -> Result<TlsStream> {
        let mut conn = ClientConnection::new(cfg.config.clone(), cfg.server_name.clone())
            .map_err(NbdError::TlsSetup)?;
        while conn.is_handshaking() {
            if let Err(source) = conn.complete_io(&mut &sock) {
                // Tell the server why (the alert rustls queued), best effort.
                while conn.wants_write() {
                    if conn.write_tls(&mut &sock).is_err() {
                        break;
                    }
                }
                return Err(NbdError::TlsHandshake {
                    addr: addr.to_string(),
                    source,
                });
            }
        }
        log::debug!(
            "nbd: TLS with {addr}: {:?}, {:?}",
            conn.protocol_version(),
            conn.negotiated_cipher_suite().map(|s| s.suite())
        );
        Ok(TlsStream {
            sock,
            st: Mutex::new(TlsState {
                conn,
                rx: vec![0; RX_BUF],
                rx_pos: 0,
                rx_end: 0,
                eof: false,
                tx: Vec::new(),
            }),
            wlock: Mutex::new(()),
        })
    }

    /// The protocol version and cipher suite, for logs (`TLSv1_3 TLS13_AES_256_GCM_SHA384`).
    pub fn describe(&self) -> String {
        let st = self.lock();
        let version = st.conn.protocol_version();
        let suite = st.conn.negotiated_cipher_suite().map(|s| s.suite());
        match (version, suite) {
            (Some(v), Some(s)) => format!("{v:?} {s:?}"),
            _ => "handshake not done".into(),
        }
    }

    /// The socket under the session.
    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    fn lock(&self) -> MutexGuard<'_, TlsState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes out everything rustls has queued. The caller holds `wlock`.
    fn drain<'a>(
        &'a self,
        mut st: MutexGuard<'a, TlsState>,
    ) -> io::Result<MutexGuard<'a, TlsState>> {
        while st.conn.wants_write() {
            let mut out = std::mem::take(&mut st.tx);
            out.clear();
            while st.conn.wants_write() {
                st.conn.write_tls(&mut out)?;
            }
            drop(st);
            let r = (&self.sock).write_all(&out);
            st = self.lock();
            st.tx = out;
            r?;
        }
        Ok(st)
    }

    /// Sends what decrypting queued, unless a write is in progress (it will send it).
    fn flush_from_reader<'a>(
        &'a self,
        st: MutexGuard<'a, TlsState>,
    ) -> io::Result<MutexGuard<'a, TlsState>> {
        if !st.conn.wants_write() {
            return Ok(st);
        }
        let w = match self.wlock.try_lock() {
            Ok(w) => w,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(st),
        };
        let st = self.drain(st)?;
        // Released under the connection lock, like the writer does.
        drop(w);
        Ok(st)
    }

    /// Sends a TLS `close_notify` (best effort, for a clean end of the session).
    pub fn close_notify(&self) {
        let w = self.wlock.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        st.conn.send_close_notify();
        if let Ok(st) = self.drain(st) {
            drop(w);
            drop(st);
        }
    }

    fn read_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut st = self.lock();
        loop {
            match st.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if st.eof {
                // rustls saw end of file and still has nothing: a truncated stream.
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if st.rx_pos < st.rx_end {
                let s = &mut *st;
                let n = s.conn.read_tls(&mut &s.rx[s.rx_pos..s.rx_end])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS input not accepted",
                    ));
                }
                s.rx_pos += n;
                let r = s.conn.process_new_packets();
                // An error queues an alert for the server: send it before failing.
                st = self.flush_from_reader(st)?;
                r.map_err(tls_io_err)?;
                continue;
            }
            let mut rx = std::mem::take(&mut st.rx);
            drop(st);
            let r = (&self.sock).read(&mut rx);
            st = self.lock();
            st.rx = rx;
            match r {
                Ok(0) => {
                    st.eof = true;
                    st.conn.read_tls(&mut &[][..])?;
                    let r = st.conn.process_new_packets();
                    r.map_err(tls_io_err)?;
                }
                Ok(n) => {
                    st.rx_pos = 0;
                    st.rx_end = n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn write_plain(&self, buf: &[u8]) -> io::Result<usize> {
        let w = self.wlock.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        let n = st.conn.writer().write(buf)?;
        let st = self.drain(st)?;
        // Let go of the write lock while still holding the connection lock: a reader that
        // queued output after our last check either sees the write lock free or has its
        // output sent by the check above.
        drop(w);
        drop(st);
        Ok(n)
    }
}

/// What became of a session offered to the kernel by [`TlsStream::into_kernel`].
#[derive(Debug)]
pub enum KernelTls {
    /// The kernel encrypts and decrypts the session's records: the socket reads and writes
    /// plaintext.
    On(TcpStream),
    /// The kernel cannot take this session (the reason); it goes on in user space.
    Declined(Box<TlsStream>, String),
}

impl TlsStream {
    /// Hands the session to the kernel (kTLS), between requests: nothing may be left
    /// half-read or unsent. Declined, with the session intact, where the kernel cannot take
    /// it: not a TCP socket, no `tls` module, data pending, another TLS version. An error
    /// means the keys were extracted but the kernel refused them: the session is lost.
    ///
    /// Afterwards any record other than application data (a late session ticket, a
    /// `KeyUpdate`, the server's `close_notify`) makes the socket's reads fail with `EIO`, and
    /// the engine reconnects; nothing is sent for `close_notify` when the connection ends, and
    /// no `KeyUpdate` is ever sent (the kernel does not).
    pub fn into_kernel(self) -> Result<KernelTls> {
        let decline = |t: TlsStream, why: String| Ok(KernelTls::Declined(Box::new(t), why));
        let (pending, version) = {
            let mut st = self.lock();
            let s = &mut *st;
            let plaintext = s
                .conn
                .process_new_packets()
                .map(|io| io.plaintext_bytes_to_read())
                .unwrap_or(1);
            let pending = s.rx_pos < s.rx_end || s.eof || s.conn.wants_write() || plaintext > 0;
            (pending, s.conn.protocol_version())
        };
        if pending {
            return decline(self, "data pending".into());
        }
        let version = match version {
            Some(ProtocolVersion::TLSv1_2) => libc::TLS_1_2_VERSION,
            Some(ProtocolVersion::TLSv1_3) => libc::TLS_1_3_VERSION,
            v => return decline(self, format!("the kernel does not take {v:?}")),
        };
        let TlsStream { sock, st, wlock } = self;
        let tcp = match sock {
            Stream::Tcp(tcp) => tcp,
            sock => {
                let why = "kernel TLS needs a TCP socket".into();
                return decline(TlsStream { sock, st, wlock }, why);
            }
        };
        // Harmless if the rest fails before the keys are set: the socket passes data through.
        if let Err(e) = setsockopt(&tcp, sockopt::TcpUlp::default(), b"tls") {
            let why = format!("no kernel TLS (TCP_ULP \"tls\": {e}; is the tls module loaded?)");
            let sock = Stream::Tcp(tcp);
            return decline(TlsStream { sock, st, wlock }, why);
        }
        let conn = st.into_inner().unwrap_or_else(|e| e.into_inner()).conn;
        let secrets = conn
            .dangerous_extract_secrets()
            .map_err(|e| ktls_err(format!("cannot extract the session keys: {e}")))?;
        let tx = crypto_info(version, secrets.tx, true)?;
        let rx = crypto_info(version, secrets.rx, false)?;
        setsockopt(&tcp, sockopt::TcpTlsTx, &tx).map_err(|e| ktls_err(format!("TLS_TX: {e}")))?;
        setsockopt(&tcp, sockopt::TcpTlsRx, &rx).map_err(|e| ktls_err(format!("TLS_RX: {e}")))?;
        Ok(KernelTls::On(tcp))
    }
}

fn ktls_err(why: String) -> NbdError {
    NbdError::KernelTls(why)
}

/// The kernel's form of one direction's traffic keys: `version` and the
/// sequence number of the next record with `secrets`; `tx` for the sending direction.
fn crypto_info(
    version: u16,
    (seq, secrets): (u64, ConnectionTrafficSecrets),
    tx: bool,
) -> Result<sockopt::TlsCryptoInfo> {
    let info = |cipher_type| libc::tls_crypto_info {
        version,
        cipher_type,
    };
    let bad = |_| ktls_err("unexpected key or IV length".into());
    let rec_seq = seq.to_be_bytes();
    // For AES-GCM the kernel takes the 12-byte IV as a 4-byte salt and 8 bytes of IV. In TLS
    // 1.2 those 8 bytes are the explicit nonce of the next record it sends, and it counts up
    // from there, where rustls sent `iv XOR seq`: starting from rustls's IV would reuse the
    // nonces of the records rustls sent (the Finished, the options). A random start does
    // not (the receiver reads each record's explicit nonce from the record).
    let explicit = |iv: &[u8]| -> Result<[u8; 8]> {
        let mut n: [u8; 8] = iv.try_into().map_err(bad)?;
        if tx && version == libc::TLS_1_2_VERSION {
            rustls::crypto::ring::default_provider()
                .secure_random
                .fill(&mut n)
                .map_err(|_| ktls_err("no random bytes for the TLS 1.2 nonce".into()))?;
        }
        Ok(n)
    };
    Ok(match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            let (salt, iv) = iv.as_ref().split_at(4);
            sockopt::TlsCryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                info: info(libc::TLS_CIPHER_AES_GCM_128),
                iv: explicit(iv)?,
                key: key.as_ref().try_into().map_err(bad)?,
                salt: salt.try_into().map_err(bad)?,
                rec_seq,
            })
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            let (salt, iv) = iv.as_ref().split_at(4);
            sockopt::TlsCryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                info: info(libc::TLS_CIPHER_AES_GCM_256),
                iv: explicit(iv)?,
                key: key.as_ref().try_into().map_err(bad)?,
                salt: salt.try_into().map_err(bad)?,
                rec_seq,
            })
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            sockopt::TlsCryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                info: info(libc::TLS_CIPHER_CHACHA20_POLY1305),
                iv: iv.as_ref().try_into().map_err(bad)?,
                key: key.as_ref().try_into().map_err(bad)?,
                salt: [],
                rec_seq,
            })
        }
        _ => return Err(ktls_err("a cipher the kernel does not take".into())),
    })
}

impl Read for &TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_plain(buf)
    }
}

impl Write for &TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_plain(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn aes256(iv: [u8; 12]) -> ConnectionTrafficSecrets {
        ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([7u8; 32]),
            iv: Iv::new(iv),
        }
    }

    fn gcm256(info: sockopt::TlsCryptoInfo) -> libc::tls12_crypto_info_aes_gcm_256 {
        match info {
            sockopt::TlsCryptoInfo::Aes256Gcm(i) => i,
            other => panic!("not AES-256-GCM: {other:?}"),
        }
    }

    #[test]
    fn test_crypto_info_for_the_kernel() {
        let iv: [u8; 12] = std::array::from_fn(|i| i as u8 + 1);
        let seq = 0x0102_0304_0506_0708u64;
        for (version, tx) in [
            (libc::TLS_1_3_VERSION, true),
            (libc::TLS_1_3_VERSION, false),
            (libc::TLS_1_2_VERSION, false),
        ] {
            let k = gcm256(crypto_info(version, (seq, aes256(iv)), tx).unwrap());
            assert_eq!(k.info.version, version);
            assert_eq!(k.info.cipher_type, libc::TLS_CIPHER_AES_GCM_256);
            assert_eq!(k.salt, iv[..4]);
            assert_eq!(k.iv, iv[4..]);
            assert_eq!(k.key, [7u8; 32]);
            assert_eq!(k.rec_seq, seq.to_be_bytes());
        }
        // TLS 1.2 sending: the kernel counts explicit nonces up from `iv`, which must not
        // meet the ones rustls used (`iv XOR seq`): a fresh random start each time.
        let a = gcm256(crypto_info(libc::TLS_1_2_VERSION, (seq, aes256(iv)), true).unwrap());
        let b = gcm256(crypto_info(libc::TLS_1_2_VERSION, (seq, aes256(iv)), true).unwrap());
        assert_eq!(a.salt, iv[..4]);
        assert_ne!(a.iv, iv[4..]);
        assert_ne!(a.iv, b.iv);
        // ChaCha20-Poly1305: the whole 12-byte IV, no salt.
        let c = ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: AeadKey::from([9u8; 32]),
            iv: Iv::new(iv),
        };
        match crypto_info(libc::TLS_1_3_VERSION, (seq, c), true).unwrap() {
            sockopt::TlsCryptoInfo::Chacha20Poly1305(k) => {
                assert_eq!(k.iv, iv);
                assert_eq!(k.key, [9u8; 32]);
                assert_eq!(k.rec_seq, seq.to_be_bytes());
            }
            other => panic!("not ChaCha20-Poly1305: {other:?}"),
        }
    }
}
