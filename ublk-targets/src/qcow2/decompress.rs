//! Decompression of compressed clusters (pure: bytes in, bytes out).
//!
//! The compressed length is only known to sector precision, and another compressed cluster may
//! follow in the same sector, so both decoders stop as soon as the output cluster is full and
//! tolerate trailing input; running out of input before the cluster is full is an error.

use super::header::CompressionType;

/// Decompresses `input` into exactly `out.len()` bytes.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Deflate => inflate_raw(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use flate2::{Decompress, FlushDecompress, Status};
    // Raw deflate (no zlib header), as qemu writes it (windowBits -12; a 32 KiB window decodes
    // streams made with any smaller window).
    let mut d = Decompress::new(false);
    loop {
        let consumed = d.total_in() as usize;
        let produced = d.total_out() as usize;
        if produced == out.len() {
            return Ok(());
        }
        let status = d
            .decompress(
                &input[consumed..],
                &mut out[produced..],
                FlushDecompress::Finish,
            )
            .map_err(|e| format!("deflate: {e}"))?;
        let progressed = d.total_in() as usize != consumed || d.total_out() as usize != produced;
        match status {
            Status::StreamEnd => {
                if (d.total_out() as usize) < out.len() {
                    return Err(format!(
                        "deflate stream ended after {} of {} bytes",
                        d.total_out(),
                        out.len()
                    ));
                }
                return Ok(());
            }
            Status::Ok | Status::BufError => {
                if !progressed {
                    if (d.total_out() as usize) == out.len() {
                        return Ok(());
                    }
                    return Err(format!(
                        "deflate input exhausted after {} of {} bytes",
                        d.total_out(),
                        out.len()
                    ));
                }
            }
        }
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
    let mut inb = InBuffer::around(input);
    let mut produced = 0usize;
    while produced < out.len() {
        let before_in = inb.pos();
        let mut outb = OutBuffer::around(&mut out[produced..]);
        let hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| format!("zstd: {e}"))?;
        let n = outb.pos();
        produced += n;
        if produced == out.len() {
            break;
        }
        if hint == 0 {
            return Err(format!(
                "zstd frame ended after {produced} of {} bytes",
                out.len()
            ));
        }
        if n == 0 && inb.pos() == before_in {
            return Err(format!(
                "zstd input exhausted after {produced} of {} bytes",
                out.len()
            ));
        }
    }
    Ok(())
}
