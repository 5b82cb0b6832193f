//! The HTTP CONNECT frontend's request head: read incrementally, judged once complete, and
//! its target checked before anything is dialled. Kept apart from the I/O so that the fuzz
//! target can feed it bytes in any split.

use bytes::BytesMut;

/// Largest request head read (upstream allows 1 MiB).
pub const MAX_HEAD: usize = 1 << 20;

#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    Closed,
    Malformed(String),
    NotConnect(String),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub target: String,
    /// `tether-server probe` asked which agent serves the dial (kube-apiserver never does).
    pub probe: bool,
}

/// Collects a request head from reads of any size.
#[derive(Default)]
pub struct HeadReader {
    buf: BytesMut,
    /// How far the buffer has been searched for the blank line that ends a head.
    scanned: usize,
}

impl HeadReader {
    /// Where the next read goes.
    pub fn buffer(&mut self) -> &mut BytesMut {
        self.buf.reserve(1024);
        &mut self.buf
    }

    /// The error for a client that closed now.
    pub fn closed(&self) -> HeadError {
        if self.buf.is_empty() {
            HeadError::Closed
        } else {
            HeadError::Malformed("connection closed inside the request head".into())
        }
    }

    /// Judges what has been read: the head and the bytes after it once it is complete,
    /// `None` while more is needed.
    ///
    /// Parsing happens only once a blank line has arrived: re-parsing the whole buffer after
    /// every read would let a client that sends a byte at a time make the server do work
    /// quadratic in the head's size.
    pub fn parse(&mut self) -> Result<Option<(Head, BytesMut)>, HeadError> {
        // A blank line can straddle two reads ("\r\n\r" + "\n").
        let from = self.scanned.saturating_sub(2);
        self.scanned = self.buf.len();
        if !ends_a_line_pair(&self.buf[from..]) {
            return self.partial();
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => {
                let method = request.method.unwrap_or("").to_owned();
                if method != "CONNECT" {
                    return Err(HeadError::NotConnect(method));
                }
                if request.version != Some(1) {
                    return Err(HeadError::Malformed("only HTTP/1.1 is supported".into()));
                }
                let target = request.path.unwrap_or("").to_owned();
                let probe = request
                    .headers
                    .iter()
                    .any(|h| h.name.eq_ignore_ascii_case(tether_proto::metadata::PROBE));
                let rest = self.buf.split_off(len);
                Ok(Some((Head { target, probe }, rest)))
            }
            Ok(httparse::Status::Partial) => self.partial(),
            Err(err) => Err(HeadError::Malformed(err.to_string())),
        }
    }

    fn partial(&self) -> Result<Option<(Head, BytesMut)>, HeadError> {
        if self.buf.len() < MAX_HEAD {
            Ok(None)
        } else {
            Err(HeadError::Malformed("request head exceeds 1 MiB".into()))
        }
    }
}

/// Whether `bytes` hold an empty line (httparse accepts bare LF line ends too).
fn ends_a_line_pair(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| w == b"\n\n") || bytes.windows(3).any(|w| w == b"\n\r\n")
}

/// A CONNECT target must be `host:port` (IPv6 in brackets) with a numeric, non-zero port.
pub fn validate_target(target: &str) -> Result<(), &'static str> {
    let (host, port) = target.rsplit_once(':').ok_or("missing :port")?;
    let port: u16 = port
        .parse()
        .map_err(|_| "port is not a number from 1 to 65535")?;
    if port == 0 {
        return Err("port 0");
    }
    let host = if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or("unbalanced [")?;
        inner
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| "bracketed host is not an IPv6 address")?;
        return Ok(());
    } else {
        host
    };
    if host.is_empty() {
        return Err("empty host");
    }
    if host.contains(':') {
        return Err("IPv6 hosts need brackets");
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    {
        return Err("host has characters no DNS name or IP address has");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(reader: &mut HeadReader, bytes: &[u8]) -> Result<Option<(Head, BytesMut)>, HeadError> {
        reader.buffer().extend_from_slice(bytes);
        reader.parse()
    }

    #[test]
    fn a_head_split_anywhere_reads_the_same() {
        let request = b"CONNECT 10.0.0.1:10250 HTTP/1.1\r\nHost: x\r\nTether-Probe: 1\r\n\r\nearly";
        for cut in 0..request.len() {
            let mut reader = HeadReader::default();
            let (head, rest) = match feed(&mut reader, &request[..cut]).unwrap() {
                // What the client sent after the head arrives in later reads.
                Some((head, mut rest)) => {
                    rest.extend_from_slice(&request[cut..]);
                    (head, rest)
                }
                None => feed(&mut reader, &request[cut..]).unwrap().unwrap(),
            };
            assert_eq!(head.target, "10.0.0.1:10250", "cut at {cut}");
            assert!(head.probe);
            assert_eq!(&rest[..], b"early", "cut at {cut}");
        }
    }

    #[test]
    fn refuses_other_methods_and_oversized_heads() {
        let mut reader = HeadReader::default();
        assert_eq!(
            feed(&mut reader, b"GET / HTTP/1.1\n\n").unwrap_err(),
            HeadError::NotConnect("GET".into())
        );
        let mut reader = HeadReader::default();
        let mut line = b"CONNECT a:1 HTTP/1.1\r\nX: ".to_vec();
        line.resize(MAX_HEAD, b'x');
        assert!(matches!(
            feed(&mut reader, &line),
            Err(HeadError::Malformed(_))
        ));
        assert_eq!(HeadReader::default().closed(), HeadError::Closed);
    }

    #[test]
    fn validates_connect_targets() {
        assert!(validate_target("10.0.0.1:10250").is_ok());
        assert!(validate_target("node-1.example:443").is_ok());
        assert!(validate_target("[fd00::1]:10250").is_ok());
        assert!(validate_target("fd00::1:10250").is_err());
        assert!(validate_target("host").is_err());
        assert!(validate_target("host:99999").is_err());
        assert!(validate_target(":80").is_err());
        assert!(validate_target("bad host:80").is_err());
        assert!(validate_target("[nope]:80").is_err());
    }
}
