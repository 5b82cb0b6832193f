//! A read buffer under a TLS session that holds memory only while data is arriving.
//!
//! rustls asks its transport for at most 4 KiB at a time, so a bulk transfer read straight off
//! a socket costs a `recvfrom` per 4 KiB, four or more per 16 KiB record. [`ReadAhead`] takes up
//! to 64 KiB per call and hands it out in the small pieces rustls wants. Its buffer is released
//! whenever the socket has nothing more to read, so a connection that sits idle (an HTTP CONNECT
//! tunnel over TLS, one connection per tunnel) costs nothing extra. Writes pass straight
//! through, vectored.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes taken from the socket per read.
const READ_AHEAD: usize = 64 * 1024;

pub struct ReadAhead<S> {
    inner: S,
    /// Bytes read but not yet handed out; no allocation while idle.
    buffered: BytesMut,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buffered: BytesMut::new(),
        }
    }
}

impl<S: std::os::fd::AsRawFd> std::os::fd::AsRawFd for ReadAhead<S> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.inner.as_raw_fd()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered.is_empty() {
            if out.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buffered.reserve(READ_AHEAD);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buffered) {
                Poll::Pending => {
                    this.buffered = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(result) => {
                    result?;
                }
            }
        }
        let n = out.remaining().min(this.buffered.len());
        out.put_slice(&this.buffered[..n]);
        this.buffered.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn hands_out_everything_in_order_and_frees_when_drained() {
        let (mut writer, reader) = tokio::io::duplex(1 << 20);
        let mut reader = ReadAhead::new(reader);
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        writer.write_all(&sent).await.unwrap();
        let mut got = vec![0u8; sent.len()];
        // Small reads, as rustls makes them.
        for piece in got.chunks_mut(4096) {
            reader.read_exact(piece).await.unwrap();
        }
        assert_eq!(got, sent);
        // Nothing left to read: the next read waits, and the buffer is given back meanwhile.
        let mut one = [0u8; 1];
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(20), reader.read(&mut one)).await;
        assert!(pending.is_err(), "read should have waited");
        assert_eq!(reader.buffered.capacity(), 0);
        writer.shutdown().await.unwrap();
        assert_eq!(reader.read(&mut one).await.unwrap(), 0);
    }
}
