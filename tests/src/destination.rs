//! Local destinations for tunnelled connections.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An HTTP server on 127.0.0.1 that answers every request with `hello from destination`.
pub async fn hello() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "hello from destination";
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// A server on 127.0.0.1 that echoes every byte back.
pub async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A server on 127.0.0.1 that accepts connections and never reads from them.
pub async fn black_hole() -> SocketAddr {
    hold_everything(TcpListener::bind("127.0.0.1:0").await.expect("bind"))
}

/// Accepts on `listener` and keeps every connection, unread, until the runtime ends.
fn hold_everything(listener: TcpListener) -> SocketAddr {
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// A port on 127.0.0.1 that refuses connections and stays refusing while the returned socket
/// lives: bound, never listening, so no other test can take the port meanwhile.
pub fn refusing_port() -> (socket2::Socket, SocketAddr) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let addr = socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("an IP address");
    (socket, addr)
}

/// A server on 127.0.0.1 that writes bytes as fast as the connection takes them.
pub async fn flood() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk = vec![0x42u8; 64 * 1024];
                while stream.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

/// A listener on 127.0.0.1 whose accept queue is full, so new connections hang in SYN-SENT
/// (a dial that neither succeeds nor fails until its timeout). Keep the returned value alive.
pub async fn stuck() -> (
    SocketAddr,
    Vec<tokio::net::TcpStream>,
    tokio::net::TcpListener,
) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(0).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(stream);
        }
    }
    (addr, fillers, listener)
}

/// A server on 127.0.0.1 that reads until the client half-closes, then answers
/// `got N bytes` and closes.
pub async fn reply_after_eof() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                if stream.read_to_end(&mut seen).await.is_ok() {
                    let _ = stream
                        .write_all(format!("got {} bytes", seen.len()).as_bytes())
                        .await;
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// Byte `offset + k` of the test pattern into `buf[k]`. Its period (251 × 253 bytes) matches
/// no buffer size, so a lost, repeated or reordered chunk shows.
pub fn pattern(offset: u64, buf: &mut [u8]) {
    for (k, byte) in buf.iter_mut().enumerate() {
        let i = offset + k as u64;
        *byte = ((i % 251) ^ ((i / 251) % 253)) as u8;
    }
}

/// What a reader of the test pattern saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub bytes: u64,
    /// Every byte was the pattern's byte at its position.
    pub intact: bool,
}

/// Reads to EOF at no more than `bytes_per_sec`, checking the pattern.
pub async fn read_pattern_throttled<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    bytes_per_sec: u64,
) -> std::io::Result<Received> {
    read_pattern_until(reader, bytes_per_sec, u64::MAX).await
}

/// [`read_pattern_throttled`] for a sender that keeps the connection open: stops once `len`
/// bytes are in.
pub async fn read_pattern_exactly<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    bytes_per_sec: u64,
    len: u64,
) -> std::io::Result<Received> {
    read_pattern_until(reader, bytes_per_sec, len).await
}

/// [`read_pattern_throttled`], stopping early once `stop_at` bytes are in.
async fn read_pattern_until<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    bytes_per_sec: u64,
    stop_at: u64,
) -> std::io::Result<Received> {
    let start = tokio::time::Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut expected = vec![0u8; buf.len()];
    let mut received = Received {
        bytes: 0,
        intact: true,
    };
    loop {
        if received.bytes >= stop_at {
            return Ok(received);
        }
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(received);
        }
        pattern(received.bytes, &mut expected[..n]);
        received.intact &= buf[..n] == expected[..n];
        received.bytes += n as u64;
        let due = std::time::Duration::from_secs_f64(received.bytes as f64 / bytes_per_sec as f64);
        tokio::time::sleep_until(start + due).await;
    }
}

/// Writes `len` bytes of the test pattern.
pub async fn write_pattern<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    len: u64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0;
    while sent < len {
        let n = buf
            .len()
            .min(usize::try_from(len - sent).unwrap_or(usize::MAX));
        pattern(sent, &mut buf[..n]);
        writer.write_all(&buf[..n]).await?;
        sent += n as u64;
    }
    Ok(())
}

/// A destination on 127.0.0.1 that reads one connection at `bytes_per_sec` to EOF (or until
/// `expected` bytes are in) and reports what it got.
pub async fn slow_sink(
    bytes_per_sec: u64,
    expected: Option<u64>,
) -> (SocketAddr, tokio::sync::oneshot::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Ok((mut stream, _)) = listener.accept().await
            && let Ok(received) =
                read_pattern_until(&mut stream, bytes_per_sec, expected.unwrap_or(u64::MAX)).await
        {
            let _ = tx.send(received);
        }
    });
    (addr, rx)
}

/// A server on 127.0.0.1 that sends each connection `len` bytes of the test pattern, then
/// closes it.
pub async fn pattern_source(len: u64) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if write_pattern(&mut stream, len).await.is_ok() {
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    addr
}

/// [`pattern_source`] that keeps each connection open after sending, until the client closes.
pub async fn pattern_source_then_hold(len: u64) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if write_pattern(&mut stream, len).await.is_ok() {
                    let mut rest = Vec::new();
                    let _ = stream.read_to_end(&mut rest).await;
                }
            });
        }
    });
    addr
}

/// A destination on 127.0.0.1 that accepts, never writes, and reports when the other end of
/// each connection closed it.
pub async fn silent_until_closed() -> (SocketAddr, tokio::sync::mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink).await;
                let _ = tx.send(()).await;
            });
        }
    });
    (addr, rx)
}

/// A server on 127.0.0.1 that accepts and at once resets each connection (SO_LINGER 0).
pub async fn resetting() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_zero_linger();
            drop(stream);
        }
    });
    addr
}

/// A server on 127.0.0.1 that never reads, and never closes, what it accepts (until the
/// runtime ends). Its receive buffers are as small as the kernel allows, so a peer writing to
/// it is soon blocked.
pub async fn never_reads() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    hold_everything(socket.listen(1024).expect("listen"))
}

/// A server on 127.0.0.1 that reads everything it is sent and throws it away.
pub async fn discard() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
            });
        }
    });
    addr
}
