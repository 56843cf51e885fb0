//! The NBD wire protocol, client side: constants, and pure encoders/decoders (no IO).
//!
//! Everything here works on byte slices so it can be unit-tested and fuzzed. Decoders of what
//! the server sends validate every length against the request it answers (or a fixed cap)
//! before the caller reads or allocates anything, so a hostile server cannot make the client
//! allocate without bound.
//!
//! Reference: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

use super::error::ProtoError;

/// `NBDMAGIC`, first word of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting, and prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle greeting's second word (unsupported).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Option reply magic.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Compact request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended request magic.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended reply magic.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
/// The IANA NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// `NBD_OPT_EXPORT_NAME`
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS`
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// `NBD_REP_ACK`
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks error replies.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_POLICY`
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// `NBD_REP_ERR_INVALID`
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_PLATFORM`
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// `NBD_REP_ERR_TLS_REQD`
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// `NBD_REP_ERR_UNKNOWN`
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// `NBD_REP_ERR_SHUTDOWN`
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// `NBD_REP_ERR_TOO_BIG`
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// `NBD_REP_ERR_EXT_HEADER_REQD`
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

/// `NBD_INFO_EXPORT`
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`
pub const INFO_BLOCK_SIZE: u16 = 3;

/// `NBD_CMD_READ`
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`
pub const CMD_BLOCK_STATUS: u16 = 7;

/// `NBD_CMD_FLAG_FUA`
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// `NBD_CMD_FLAG_PAYLOAD_LEN` (extended headers)
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// `NBD_REPLY_FLAG_DONE`
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit 15 marks error chunk types.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// `NBD_REPLY_TYPE_ERROR`
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

/// NBD error values (B9).
pub mod errno {
    /// `NBD_EPERM`
    pub const EPERM: u32 = 1;
    /// `NBD_EIO`
    pub const EIO: u32 = 5;
    /// `NBD_ENOMEM`
    pub const ENOMEM: u32 = 12;
    /// `NBD_EINVAL`
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`
    pub const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW`
    pub const EOVERFLOW: u32 = 75;
    /// `NBD_ENOTSUP`
    pub const ENOTSUP: u32 = 95;
    /// `NBD_ESHUTDOWN`
    pub const ESHUTDOWN: u32 = 108;
}

/// Largest option reply payload accepted (names and descriptions are ≤ 4 KiB each).
pub const MAX_OPT_REPLY: u32 = 64 << 10;
/// Longest string (export name, description, error message) the spec allows.
pub const MAX_STRING: usize = 4096;
/// Largest error message in an error chunk.
pub const MAX_ERROR_MSG: u64 = MAX_STRING as u64;
/// Largest payload of a non-data chunk (error chunks with their message).
pub const MAX_SMALL_CHUNK: u64 = 14 + MAX_ERROR_MSG;
/// Default maximum payload when the server does not advertise one (B7).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Length of the compact request header.
pub const REQUEST_LEN: usize = 28;
/// Length of the extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Length of the server greeting (NBDMAGIC, IHAVEOPT, handshake flags).
pub const GREETING_LEN: usize = 18;
/// Length of an option reply header.
pub const OPT_REPLY_LEN: usize = 20;

/// The positive host errno for an NBD error value (B9); unexpected values map to `EINVAL`.
pub fn errno_of(e: u32) -> i32 {
    match e {
        errno::EPERM => libc::EPERM,
        errno::EIO => libc::EIO,
        errno::ENOMEM => libc::ENOMEM,
        errno::EINVAL => libc::EINVAL,
        errno::ENOSPC => libc::ENOSPC,
        errno::EOVERFLOW => libc::EOVERFLOW,
        errno::ENOTSUP => libc::EOPNOTSUPP,
        errno::ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

bitflags::bitflags! {
    /// Transmission flags of an export (B3).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
    pub struct TransmissionFlags: u16 {
        /// `NBD_FLAG_HAS_FLAGS`
        const HAS_FLAGS = 1 << 0;
        /// `NBD_FLAG_READ_ONLY`
        const READ_ONLY = 1 << 1;
        /// `NBD_FLAG_SEND_FLUSH`
        const SEND_FLUSH = 1 << 2;
        /// `NBD_FLAG_SEND_FUA`
        const SEND_FUA = 1 << 3;
        /// `NBD_FLAG_ROTATIONAL`
        const ROTATIONAL = 1 << 4;
        /// `NBD_FLAG_SEND_TRIM`
        const SEND_TRIM = 1 << 5;
        /// `NBD_FLAG_SEND_WRITE_ZEROES`
        const SEND_WRITE_ZEROES = 1 << 6;
        /// `NBD_FLAG_SEND_DF`
        const SEND_DF = 1 << 7;
        /// `NBD_FLAG_CAN_MULTI_CONN`
        const CAN_MULTI_CONN = 1 << 8;
        /// `NBD_FLAG_SEND_RESIZE`
        const SEND_RESIZE = 1 << 9;
        /// `NBD_FLAG_SEND_CACHE`
        const SEND_CACHE = 1 << 10;
        /// `NBD_FLAG_SEND_FAST_ZERO`
        const SEND_FAST_ZERO = 1 << 11;
        /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`
        const BLOCK_STATUS_PAYLOAD = 1 << 12;
        const _ = !0;
    }
}

/// Name of an option, for messages.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// Name of an option reply type, for messages.
pub fn reply_name(rep: u32) -> &'static str {
    match rep {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        r if r & REP_FLAG_ERROR != 0 => "an unknown error reply",
        _ => "an unknown reply",
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn need(b: &[u8], n: usize, what: &'static str) -> Result<(), ProtoError> {
    if b.len() < n {
        return Err(ProtoError::BadLength {
            what,
            len: b.len() as u64,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Handshake and options

/// Decodes the 18-byte server greeting; returns the handshake flags.
pub fn decode_greeting(b: &[u8]) -> Result<u16, ProtoError> {
    need(b, GREETING_LEN, "greeting")?;
    let m = be64(b);
    if m != NBDMAGIC {
        return Err(ProtoError::BadMagic {
            what: "NBDMAGIC",
            got: m,
        });
    }
    let m = be64(&b[8..]);
    if m != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "IHAVEOPT",
            got: m,
        });
    }
    Ok(be16(&b[16..]))
}

/// The client flags to answer a greeting with.
pub fn client_flags(handshake_flags: u16) -> u32 {
    let mut f = FLAG_C_FIXED_NEWSTYLE;
    if handshake_flags & FLAG_NO_ZEROES != 0 {
        f |= FLAG_C_NO_ZEROES;
    }
    f
}

/// Appends an option request (`IHAVEOPT`, option, length, data) to `out`.
pub fn encode_option(opt: u32, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The data of `NBD_OPT_GO` / `NBD_OPT_INFO`: export name and the info types requested.
pub fn encode_go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::with_capacity(6 + name.len() + 2 * infos.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// An option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptReply {
    /// The option it answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply: u32,
    /// Payload length (checked against [`MAX_OPT_REPLY`]).
    pub len: u32,
}

impl OptReply {
    /// Whether this is an error reply.
    pub fn is_error(&self) -> bool {
        self.reply & REP_FLAG_ERROR != 0
    }
}

/// Decodes a 20-byte option reply header, checking the magic, the option it answers, and the
/// payload length cap.
pub fn decode_opt_reply(b: &[u8], expect_opt: u32) -> Result<OptReply, ProtoError> {
    need(b, OPT_REPLY_LEN, "option reply")?;
    let m = be64(b);
    if m != OPT_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "option reply",
            got: m,
        });
    }
    let r = OptReply {
        option: be32(&b[8..]),
        reply: be32(&b[12..]),
        len: be32(&b[16..]),
    };
    if r.option != expect_opt {
        return Err(ProtoError::Mismatch("option reply for a different option"));
    }
    if r.len > MAX_OPT_REPLY {
        return Err(ProtoError::BadLength {
            what: "option reply",
            len: r.len.into(),
        });
    }
    if r.reply == REP_ACK && r.len != 0 {
        return Err(ProtoError::BadLength {
            what: "NBD_REP_ACK",
            len: r.len.into(),
        });
    }
    Ok(r)
}

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`, B7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockSizes {
    /// Minimum block: offsets and lengths are multiples of it.
    pub min: u32,
    /// Preferred block.
    pub preferred: u32,
    /// Maximum payload of READ/WRITE.
    pub max_payload: u32,
}

impl Default for BlockSizes {
    /// The defaults an interoperable client assumes when the server says nothing.
    fn default() -> Self {
        BlockSizes {
            min: 1,
            preferred: 4096,
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

impl BlockSizes {
    /// Checks the spec's constraints (powers of two, min ≤ 64 KiB, preferred ≥ min,
    /// max ≥ preferred) and returns the sizes, or a description of what is wrong.
    pub fn validate(self) -> Result<BlockSizes, ProtoError> {
        let ok = self.min.is_power_of_two()
            && self.min <= 64 << 10
            && self.preferred.is_power_of_two()
            && self.preferred >= self.min
            && (self.max_payload >= self.preferred || self.max_payload == u32::MAX)
            && self.max_payload.is_multiple_of(self.min);
        if ok {
            Ok(self)
        } else {
            Err(ProtoError::Mismatch("invalid NBD_INFO_BLOCK_SIZE values"))
        }
    }
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: TransmissionFlags,
    },
    /// `NBD_INFO_NAME`
    Name(String),
    /// `NBD_INFO_DESCRIPTION`
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`
    BlockSize(BlockSizes),
    /// An info type this client does not know (ignored).
    Unknown(u16),
}

/// Decodes an `NBD_REP_INFO` payload.
pub fn decode_info(b: &[u8]) -> Result<Info, ProtoError> {
    need(b, 2, "NBD_REP_INFO")?;
    let ty = be16(b);
    let body = &b[2..];
    let exact = |n: usize| {
        if body.len() == n {
            Ok(())
        } else {
            Err(ProtoError::BadLength {
                what: "NBD_REP_INFO",
                len: b.len() as u64,
            })
        }
    };
    Ok(match ty {
        INFO_EXPORT => {
            exact(10)?;
            Info::Export {
                size: be64(body),
                flags: TransmissionFlags::from_bits_retain(be16(&body[8..])),
            }
        }
        INFO_NAME => Info::Name(String::from_utf8_lossy(body).into_owned()),
        INFO_DESCRIPTION => Info::Description(String::from_utf8_lossy(body).into_owned()),
        INFO_BLOCK_SIZE => {
            exact(12)?;
            Info::BlockSize(BlockSizes {
                min: be32(body),
                preferred: be32(&body[4..]),
                max_payload: be32(&body[8..]),
            })
        }
        t => Info::Unknown(t),
    })
}

/// Decodes the `NBD_OPT_EXPORT_NAME` reply (its first 10 bytes: size, flags).
pub fn decode_export_name_reply(b: &[u8]) -> Result<(u64, TransmissionFlags), ProtoError> {
    need(b, 10, "NBD_OPT_EXPORT_NAME reply")?;
    Ok((be64(b), TransmissionFlags::from_bits_retain(be16(&b[8..]))))
}

/// Decodes an `NBD_REP_SERVER` payload (LIST): export name and description.
pub fn decode_rep_server(b: &[u8]) -> Result<(String, String), ProtoError> {
    need(b, 4, "NBD_REP_SERVER")?;
    let n = be32(b) as usize;
    if n > b.len() - 4 {
        return Err(ProtoError::BadLength {
            what: "NBD_REP_SERVER name",
            len: n as u64,
        });
    }
    // Both strings are within the spec's limit.
    let desc = &b[4 + n..];
    if n > MAX_STRING || desc.len() > MAX_STRING {
        return Err(ProtoError::BadLength {
            what: "NBD_REP_SERVER string",
            len: n.max(desc.len()) as u64,
        });
    }
    let name = String::from_utf8_lossy(&b[4..4 + n]).into_owned();
    let desc = String::from_utf8_lossy(desc).into_owned();
    Ok((name, desc))
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// `NBD_CMD_FLAG_*`
    pub flags: u16,
    /// `NBD_CMD_*`
    pub cmd: u16,
    /// Cookie (handle), echoed by the reply.
    pub cookie: u64,
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl RequestHeader {
    /// The 28-byte compact header. `len` must fit in 32 bits (checked by the caller).
    pub fn encode_compact(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&(self.len as u32).to_be_bytes());
        b
    }

    /// `NBD_CMD_DISC`, encoded for a connection with or without extended headers.
    pub fn disc(extended: bool) -> Vec<u8> {
        let h = RequestHeader {
            flags: 0,
            cmd: CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        if extended {
            h.encode_extended().to_vec()
        } else {
            h.encode_compact().to_vec()
        }
    }

    /// The 32-byte extended header; WRITE gets `NBD_CMD_FLAG_PAYLOAD_LEN`.
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_LEN] {
        let mut flags = self.flags;
        if self.cmd == CMD_WRITE {
            flags |= CMD_FLAG_PAYLOAD_LEN;
        }
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        b[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: replies

/// The length of the reply header that starts with `magic` (the first 4 bytes).
pub fn reply_header_len(magic: u32, extended: bool) -> Result<usize, ProtoError> {
    match magic {
        SIMPLE_REPLY_MAGIC if !extended => Ok(16),
        STRUCTURED_REPLY_MAGIC if !extended => Ok(20),
        EXTENDED_REPLY_MAGIC if extended => Ok(32),
        m => Err(ProtoError::BadMagic {
            what: "reply",
            got: m.into(),
        }),
    }
}

/// A reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply; READ data (`len` of the request) follows if `error == 0`.
    Simple {
        /// NBD error value (0: success).
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured (or extended) reply chunk; `len` bytes of payload follow.
    Chunk(ChunkHeader),
}

impl Reply {
    /// The cookie of the request it answers.
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } => *cookie,
            Reply::Chunk(c) => c.cookie,
        }
    }
}

/// A structured or extended reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`
    pub ty: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload length.
    pub len: u64,
}

impl ChunkHeader {
    /// Whether this is the last chunk of the reply.
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Decodes a whole reply header (16, 20 or 32 bytes, as given by [`reply_header_len`]).
pub fn decode_reply(b: &[u8], extended: bool) -> Result<Reply, ProtoError> {
    need(b, 4, "reply")?;
    let n = reply_header_len(be32(b), extended)?;
    need(b, n, "reply")?;
    Ok(match n {
        16 => Reply::Simple {
            error: be32(&b[4..]),
            cookie: be64(&b[8..]),
        },
        20 => Reply::Chunk(ChunkHeader {
            flags: be16(&b[4..]),
            ty: be16(&b[6..]),
            cookie: be64(&b[8..]),
            len: be32(&b[16..]).into(),
        }),
        _ => Reply::Chunk(ChunkHeader {
            flags: be16(&b[4..]),
            ty: be16(&b[6..]),
            cookie: be64(&b[8..]),
            // b[16..24] echoes the request offset; not needed.
            len: be64(&b[24..]),
        }),
    })
}

/// What a request expects of its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// A READ (data chunks allowed).
    pub read: bool,
    /// Request offset.
    pub offset: u64,
    /// Request length.
    pub len: u32,
}

/// How to read the payload of a chunk, decided from its header before reading anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkPlan {
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: read the 8-byte offset, check it with [`place_data`],
    /// then read `data_len` bytes into the request buffer.
    OffsetData {
        /// Bytes of data after the offset.
        data_len: u32,
    },
    /// Read the whole (small, bounded) payload, then decode it with [`decode_small_chunk`].
    Small {
        /// Payload length (≤ [`MAX_SMALL_CHUNK`]).
        len: usize,
    },
}

/// Checks a chunk header against the request it answers and says how to read its payload.
/// Unknown non-error chunk types, data for non-READs, and lengths beyond the request (or
/// [`MAX_SMALL_CHUNK`]) are protocol violations.
pub fn plan_chunk(h: &ChunkHeader, e: &Expect) -> Result<ChunkPlan, ProtoError> {
    let bad = |what| ProtoError::BadLength { what, len: h.len };
    match h.ty {
        REPLY_TYPE_NONE => {
            if h.len != 0 {
                return Err(bad("NBD_REPLY_TYPE_NONE"));
            }
            if !h.done() {
                return Err(ProtoError::Mismatch("NBD_REPLY_TYPE_NONE without DONE"));
            }
            Ok(ChunkPlan::Small { len: 0 })
        }
        REPLY_TYPE_OFFSET_DATA => {
            if !e.read {
                return Err(ProtoError::Mismatch(
                    "data chunk for a request without data",
                ));
            }
            if h.len < 9 || h.len - 8 > u64::from(e.len) {
                return Err(bad("NBD_REPLY_TYPE_OFFSET_DATA"));
            }
            Ok(ChunkPlan::OffsetData {
                data_len: (h.len - 8) as u32,
            })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if !e.read {
                return Err(ProtoError::Mismatch(
                    "hole chunk for a request without data",
                ));
            }
            if h.len != 12 {
                return Err(bad("NBD_REPLY_TYPE_OFFSET_HOLE"));
            }
            Ok(ChunkPlan::Small { len: 12 })
        }
        REPLY_TYPE_ERROR => {
            if h.len < 6 || h.len > 6 + MAX_ERROR_MSG {
                return Err(bad("NBD_REPLY_TYPE_ERROR"));
            }
            Ok(ChunkPlan::Small {
                len: h.len as usize,
            })
        }
        REPLY_TYPE_ERROR_OFFSET => {
            if h.len < 14 || h.len > 14 + MAX_ERROR_MSG {
                return Err(bad("NBD_REPLY_TYPE_ERROR_OFFSET"));
            }
            Ok(ChunkPlan::Small {
                len: h.len as usize,
            })
        }
        t if t & REPLY_TYPE_FLAG_ERROR != 0 => {
            // Unknown error type: the request failed; the payload starts like ERROR's.
            if h.len > MAX_SMALL_CHUNK {
                return Err(bad("error chunk"));
            }
            Ok(ChunkPlan::Small {
                len: h.len as usize,
            })
        }
        t => Err(ProtoError::UnknownChunk(t)),
    }
}

/// Where the data of an `OFFSET_DATA` chunk at `chunk_offset` (`data_len` bytes) goes in the
/// request buffer.
pub fn place_data(e: &Expect, chunk_offset: u64, data_len: u32) -> Result<u32, ProtoError> {
    let rel = chunk_offset
        .checked_sub(e.offset)
        .ok_or(ProtoError::Mismatch("data chunk before the request"))?;
    match rel.checked_add(data_len.into()) {
        Some(end) if end <= u64::from(e.len) => Ok(rel as u32),
        _ => Err(ProtoError::Mismatch("data chunk beyond the request")),
    }
}

/// A decoded non-data chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkEvent {
    /// Nothing (`NBD_REPLY_TYPE_NONE`).
    None,
    /// A hole: `len` bytes at `buf_off` in the request buffer read as zeros.
    Hole {
        /// Offset in the request buffer.
        buf_off: u32,
        /// Length.
        len: u32,
    },
    /// The request failed.
    Error {
        /// NBD error value.
        error: u32,
        /// The server's message.
        message: String,
    },
}

/// Decodes the payload of a chunk planned as [`ChunkPlan::Small`].
pub fn decode_small_chunk(h: &ChunkHeader, p: &[u8], e: &Expect) -> Result<ChunkEvent, ProtoError> {
    match h.ty {
        REPLY_TYPE_NONE => Ok(ChunkEvent::None),
        REPLY_TYPE_OFFSET_HOLE => {
            need(p, 12, "NBD_REPLY_TYPE_OFFSET_HOLE")?;
            let off = be64(p);
            let len = be32(&p[8..]);
            if len == 0 {
                return Err(ProtoError::Mismatch("empty hole chunk"));
            }
            let buf_off = place_data(e, off, len)?;
            Ok(ChunkEvent::Hole { buf_off, len })
        }
        t if t & REPLY_TYPE_FLAG_ERROR != 0 => {
            if p.len() < 6 {
                // Unknown error type without the common prefix: still a failure.
                return Ok(ChunkEvent::Error {
                    error: errno::EINVAL,
                    message: String::new(),
                });
            }
            let error = be32(p);
            let mlen = usize::from(be16(&p[4..]));
            let min = if t == REPLY_TYPE_ERROR_OFFSET {
                6 + mlen + 8
            } else {
                6 + mlen
            };
            if p.len() < min || (t == REPLY_TYPE_ERROR && p.len() != min) {
                return Err(ProtoError::BadLength {
                    what: "error chunk message",
                    len: mlen as u64,
                });
            }
            let message = String::from_utf8_lossy(&p[6..6 + mlen]).into_owned();
            // An error chunk with value 0 is a server bug; still fail the request.
            let error = if error == 0 { errno::EINVAL } else { error };
            Ok(ChunkEvent::Error { error, message })
        }
        _ => Err(ProtoError::Mismatch("chunk type not decodable as small")),
    }
}

/// Most disjoint ranges one READ reply may be split into before the client gives up.
pub const MAX_FRAGMENTS: usize = 1024;

/// Which bytes of a READ have arrived: disjoint, coalesced ranges. Overlaps and too much
/// fragmentation are protocol errors. The vector keeps its capacity across requests.
#[derive(Debug, Clone, Default)]
pub struct Coverage {
    ranges: Vec<(u32, u32)>,
    covered: u64,
}

impl Coverage {
    /// Forgets everything (keeps the allocation).
    pub fn clear(&mut self) {
        self.ranges.clear();
        self.covered = 0;
    }

    /// Bytes covered so far.
    pub fn covered(&self) -> u64 {
        self.covered
    }

    /// Records `[off, off + len)`; fails on overlap with what arrived before.
    pub fn add(&mut self, off: u32, len: u32) -> Result<(), ProtoError> {
        if len == 0 {
            return Ok(());
        }
        let end = u64::from(off) + u64::from(len);
        // First range starting at or after `off`.
        let i = self.ranges.partition_point(|&(s, _)| s < off);
        if i > 0 && u64::from(self.ranges[i - 1].1) > u64::from(off) {
            return Err(ProtoError::Mismatch("overlapping read chunks"));
        }
        if i < self.ranges.len() && u64::from(self.ranges[i].0) < end {
            return Err(ProtoError::Mismatch("overlapping read chunks"));
        }
        let end = end as u32;
        let merge_prev = i > 0 && self.ranges[i - 1].1 == off;
        let merge_next = i < self.ranges.len() && self.ranges[i].0 == end;
        match (merge_prev, merge_next) {
            (true, true) => {
                self.ranges[i - 1].1 = self.ranges[i].1;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].1 = end,
            (false, true) => self.ranges[i].0 = off,
            (false, false) => {
                if self.ranges.len() >= MAX_FRAGMENTS {
                    return Err(ProtoError::Mismatch("read reply too fragmented"));
                }
                self.ranges.insert(i, (off, end));
            }
        }
        self.covered += u64::from(len);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
