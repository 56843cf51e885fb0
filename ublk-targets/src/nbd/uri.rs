//! NBD URIs (`nbd://`, `nbd+unix://`, `nbd+vsock://`, and with TLS `nbds://`, `nbds+unix://`,
//! `nbds+vsock://`), after the NBD project's `doc/uri.md`.

use super::error::NbdError;
use super::proto::DEFAULT_PORT;
use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdAddr {
    /// TCP: host name or address (IPv6 without brackets), and port.
    Tcp {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix domain socket. A path starting with a NUL byte names an abstract socket.
    Unix(PathBuf),
    /// A VM socket (`AF_VSOCK`): context id (2 is the host, 1 this machine) and port.
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
    },
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            NbdAddr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

/// TLS settings of a URI (or of the command line).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsParams {
    /// Directory with `ca-cert.pem` and optionally `client-cert.pem` + `client-key.pem` (the
    /// qemu / nbdkit layout; `tls-certificates=`). `None`: trust the system CA bundle.
    pub certificates: Option<PathBuf>,
    /// Name the server's certificate must carry (`tls-hostname=`); default: the host
    /// (`localhost` for Unix sockets).
    pub hostname: Option<String>,
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    /// The server address.
    pub addr: NbdAddr,
    /// The export name (percent-decoded; empty for the default export).
    pub export: String,
    /// TLS is required (`nbds://`), with these settings. `None`: plaintext.
    pub tls: Option<TlsParams>,
}

fn bad(msg: impl Into<String>) -> NbdError {
    NbdError::Uri(msg.into())
}

/// Decodes `%XX` escapes.
pub fn percent_decode(s: &str) -> Result<Vec<u8>, NbdError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(format!("bad percent escape in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

impl NbdUri {
    /// Parses `nbd[s]://HOST[:PORT][/EXPORT]`, `nbd[s]+unix:///[EXPORT]?socket=PATH` or
    /// `nbd[s]+vsock://CID[:PORT][/EXPORT]`.
    /// With `nbds`, TLS (X.509) is required; the query may carry `tls-certificates=DIR`,
    /// `tls-hostname=NAME`, `tls-type=x509` and `tls-verify-peer=1`. Other TLS modes (PSK,
    /// anonymous, no peer verification) are refused.
    pub fn parse(uri: &str) -> Result<NbdUri, NbdError> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| bad(format!("{uri:?} has no scheme")))?;
        let (transport, tls) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => (Transport::Tcp, false),
            "nbd+unix" => (Transport::Unix, false),
            "nbd+vsock" => (Transport::Vsock, false),
            "nbds" => (Transport::Tcp, true),
            "nbds+unix" => (Transport::Unix, true),
            "nbds+vsock" => (Transport::Vsock, true),
            s => return Err(bad(format!("unknown scheme {s:?}"))),
        };
        if rest.contains('#') {
            return Err(bad("fragments are not allowed"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let export_bytes = percent_decode(path.strip_prefix('/').unwrap_or(path))?;
        let export = String::from_utf8(export_bytes)
            .map_err(|_| bad("the export name is not valid UTF-8"))?;
        if export.len() > 4096 {
            return Err(bad("the export name is longer than 4096 bytes"));
        }

        let mut socket = None;
        let mut tls_params = TlsParams::default();
        for kv in query.into_iter().flat_map(|q| q.split('&')) {
            if kv.is_empty() {
                continue;
            }
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "socket" if transport == Transport::Unix => socket = Some(percent_decode(v)?),
                "socket" => return Err(bad("socket= is only valid with nbd+unix://")),
                k if k.starts_with("tls-") && !tls => {
                    log::warn!("nbd: ignoring {k}= in a non-TLS URI");
                }
                "tls-certificates" => {
                    let d = percent_decode(v)?;
                    if d.is_empty() {
                        return Err(bad("empty tls-certificates= directory"));
                    }
                    tls_params.certificates = Some(PathBuf::from(OsString::from_vec(d)));
                }
                "tls-hostname" => {
                    let h = String::from_utf8(percent_decode(v)?)
                        .map_err(|_| bad("tls-hostname= is not valid UTF-8"))?;
                    if h.is_empty() {
                        return Err(bad("empty tls-hostname="));
                    }
                    tls_params.hostname = Some(h);
                }
                "tls-type" if v.eq_ignore_ascii_case("x509") => {}
                "tls-type" => {
                    return Err(bad(format!(
                        "tls-type={v} is not supported (only x509 certificates)"
                    )))
                }
                "tls-verify-peer" if v == "1" || v.eq_ignore_ascii_case("true") => {}
                "tls-verify-peer" => return Err(bad(
                    "tls-verify-peer=0 is not supported: the server certificate is always verified",
                )),
                "tls-psk-file" => return Err(bad("TLS-PSK (tls-psk-file=) is not supported")),
                k if k.starts_with("x-") => {}
                k => return Err(bad(format!("unknown query parameter {k:?}"))),
            }
        }

        // userinfo is the TLS user name; meaningless without TLS.
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let addr = match transport {
            Transport::Vsock => vsock_addr(host_port)?,
            Transport::Unix => unix_addr(host_port, socket)?,
            Transport::Tcp => tcp_addr(host_port)?,
        };
        Ok(NbdUri {
            addr,
            export,
            tls: tls.then_some(tls_params),
        })
    }
}

/// `CID[:PORT]` of an `nbd+vsock://` URI.
fn vsock_addr(host_port: &str) -> Result<NbdAddr, NbdError> {
    let (cid, port) = match host_port.split_once(':') {
        Some((c, p)) => (c, Some(p)),
        None => (host_port, None),
    };
    let cid = cid.parse().map_err(|_| {
        bad(format!(
            "bad vsock context id {cid:?} (a number, e.g. 2 for the host)"
        ))
    })?;
    let port = match port {
        None | Some("") => u32::from(DEFAULT_PORT),
        Some(p) => p.parse().map_err(|_| bad(format!("bad port {p:?}")))?,
    };
    Ok(NbdAddr::Vsock { cid, port })
}

/// The socket of an `nbd+unix://` URI (`?socket=PATH`, already decoded); no host allowed.
fn unix_addr(host_port: &str, socket: Option<Vec<u8>>) -> Result<NbdAddr, NbdError> {
    if !host_port.is_empty() {
        return Err(bad("nbd+unix:// URIs must not name a host"));
    }
    let s = socket.ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?;
    if s.is_empty() {
        return Err(bad("empty socket path"));
    }
    Ok(NbdAddr::Unix(PathBuf::from(OsString::from_vec(s))))
}

/// `HOST[:PORT]` or `[IPv6][:PORT]` of an `nbd://` URI; the host defaults to localhost.
fn tcp_addr(host_port: &str) -> Result<NbdAddr, NbdError> {
    let (host, port) = if let Some(r) = host_port.strip_prefix('[') {
        let (h, after) = r
            .split_once(']')
            .ok_or_else(|| bad("unterminated IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| bad("junk after IPv6 address"))?,
            ),
        };
        (h.to_string(), port)
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (host_port.to_string(), None),
        }
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p.parse().map_err(|_| bad(format!("bad port {p:?}")))?,
    };
    let host = if host.is_empty() {
        "localhost".to_string()
    } else {
        String::from_utf8(percent_decode(&host)?).map_err(|_| bad("host is not valid UTF-8"))?
    };
    Ok(NbdAddr::Tcp { host, port })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Unix,
    Vsock,
}

impl std::str::FromStr for NbdUri {
    type Err = NbdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NbdUri::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(h: &str, p: u16) -> NbdAddr {
        NbdAddr::Tcp {
            host: h.into(),
            port: p,
        }
    }

    #[test]
    fn test_uri_tcp_forms() {
        let u = NbdUri::parse("nbd://example.com/disk").unwrap();
        assert_eq!(u.addr, tcp("example.com", 10809));
        assert_eq!(u.export, "disk");
        assert_eq!(NbdUri::parse("nbd://h").unwrap().export, "");
        assert_eq!(NbdUri::parse("nbd://h/").unwrap().export, "");
        assert_eq!(NbdUri::parse("nbd://h//disk").unwrap().export, "/disk");
        assert_eq!(
            NbdUri::parse("nbd://h/hello%20world").unwrap().export,
            "hello world"
        );
        let u = NbdUri::parse("nbd://10.0.0.1:1234/x").unwrap();
        assert_eq!(u.addr, tcp("10.0.0.1", 1234));
        let u = NbdUri::parse("nbd://[::1]:99/x").unwrap();
        assert_eq!(u.addr, tcp("::1", 99));
        assert_eq!(u.addr.to_string(), "[::1]:99");
        assert_eq!(
            NbdUri::parse("nbd://[::1]").unwrap().addr,
            tcp("::1", 10809)
        );
        assert_eq!(
            NbdUri::parse("nbd://alice@h:5/e").unwrap().addr,
            tcp("h", 5)
        );
        assert_eq!(NbdUri::parse("NBD://h:").unwrap().addr, tcp("h", 10809));
    }

    #[test]
    fn test_uri_unix_forms() {
        let u = NbdUri::parse("nbd+unix:///exp?socket=/tmp/s.sock").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/tmp/s.sock".into()));
        assert_eq!(u.export, "exp");
        let u = NbdUri::parse("nbd+unix://?socket=/tmp/a%20b").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/tmp/a b".into()));
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd+unix:///?socket=%00abstract").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("\0abstract".into()));
    }

    #[test]
    fn test_uri_vsock_forms() {
        let u = NbdUri::parse("nbd+vsock://2/disk").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Vsock {
                cid: 2,
                port: 10809
            }
        );
        assert_eq!(u.export, "disk");
        assert_eq!(u.tls, None);
        assert_eq!(u.addr.to_string(), "vsock:2:10809");
        let u = NbdUri::parse("nbd+vsock://1:4000000000").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Vsock {
                cid: 1,
                port: 4_000_000_000
            }
        );
        assert_eq!(u.export, "");
        let u = NbdUri::parse("NBDS+VSOCK://3:99/x?tls-hostname=srv").unwrap();
        assert_eq!(u.addr, NbdAddr::Vsock { cid: 3, port: 99 });
        assert_eq!(u.tls.unwrap().hostname.as_deref(), Some("srv"));
    }

    #[test]
    fn test_uri_tls_forms() {
        assert_eq!(NbdUri::parse("nbd://h/x").unwrap().tls, None);
        let u = NbdUri::parse("nbds://h:99/x").unwrap();
        assert_eq!(u.addr, tcp("h", 99));
        assert_eq!(u.tls, Some(TlsParams::default()));
        let u = NbdUri::parse(
            "NBDS+UNIX:///x?socket=/s&tls-certificates=/etc/pki/a%20b&tls-hostname=srv.example&tls-type=X509&tls-verify-peer=1",
        )
        .unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/s".into()));
        assert_eq!(
            u.tls,
            Some(TlsParams {
                certificates: Some("/etc/pki/a b".into()),
                hostname: Some("srv.example".into()),
            })
        );
        for bad in [
            "nbds://h/x?tls-type=psk",
            "nbds://h/x?tls-verify-peer=0",
            "nbds://h/x?tls-psk-file=/k",
            "nbds://h/x?tls-certificates=",
            "nbds://h/x?tls-hostname=",
            "nbds://h/x?tls-bogus=1",
        ] {
            assert!(
                matches!(NbdUri::parse(bad), Err(NbdError::Uri(_))),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn test_uri_errors() {
        for bad in [
            "h/x",
            "http://h/x",
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd://h/x?socket=/s",
            "nbd://h:99999/x",
            "nbd://h:abc/x",
            "nbd://h/%zz",
            "nbd://h/%4",
            "nbd://h/x?bogus=1",
            "nbd://[::1/x",
            "nbd://h/x#frag",
            "nbd+vsock:///x",
            "nbd+vsock://host/x",
            "nbd+vsock://-1/x",
            "nbd+vsock://4294967296/x",
            "nbd+vsock://2:x/x",
            "nbd+vsock://2/x?socket=/s",
        ] {
            assert!(
                matches!(NbdUri::parse(bad), Err(NbdError::Uri(_))),
                "{bad} accepted"
            );
        }
        // x- parameters and tls- parameters are tolerated.
        assert!(NbdUri::parse("nbd://h/x?x-foo=1&tls-verify-peer=0").is_ok());
    }
}
