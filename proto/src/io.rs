//! Reading payloads past a header decoder.
//!
//! The decoders in this crate yield headers only; a payload that follows a
//! header is read with these helpers. They first take whatever the
//! `FramedRead` already buffered (at most one socket read's worth, a few
//! KiB), then read the rest straight from the socket into the caller's
//! buffer, so a 32 MiB payload is never staged in the codec's buffer.

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::FramedRead;

/// Fills `dst` with the next `dst.len()` bytes of the stream.
pub async fn read_payload<R: AsyncRead + Unpin, D>(
    framed: &mut FramedRead<R, D>,
    dst: &mut [u8],
) -> std::io::Result<()> {
    let buffered = framed.read_buffer_mut();
    let n = buffered.len().min(dst.len());
    dst[..n].copy_from_slice(&buffered.split_to(n));
    if n < dst.len() {
        framed.get_mut().read_exact(&mut dst[n..]).await?;
    }
    Ok(())
}

/// Consumes and drops the next `len` bytes of the stream, in bounded pieces.
pub async fn discard_payload<R: AsyncRead + Unpin, D>(
    framed: &mut FramedRead<R, D>,
    len: u64,
) -> std::io::Result<()> {
    let buffered = framed.read_buffer_mut();
    let n = (buffered.len() as u64).min(len);
    let _ = buffered.split_to(n as usize);
    let mut left = len - n;
    let mut scratch = vec![0u8; left.min(64 * 1024) as usize];
    while left > 0 {
        let want = left.min(scratch.len() as u64) as usize;
        let got = framed.get_mut().read(&mut scratch[..want]).await?;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        left -= got as u64;
    }
    Ok(())
}
