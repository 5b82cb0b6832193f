//! The HTTP CONNECT frontend's request head, as kube-apiserver (or anyone on the socket)
//! sends it: read in reads split anywhere, it must come out exactly as when read in one piece,
//! the bytes after the head must be kept, and a target the checks accept must be `host:port`.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tether_server::frontend::connect_head::{HeadReader, validate_target};

#[derive(Arbitrary, Debug)]
struct Input {
    data: Vec<u8>,
    /// Read sizes, cycled.
    reads: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let mut whole = HeadReader::default();
    whole.buffer().extend_from_slice(&input.data);
    let at_once = whole.parse();

    let mut pieces = HeadReader::default();
    let mut offset = 0;
    let mut sizes = input.reads.iter().map(|&n| usize::from(n).max(1)).cycle();
    let in_pieces = loop {
        let size = if input.reads.is_empty() {
            input.data.len() - offset
        } else {
            sizes.next().unwrap_or(1)
        };
        let end = (offset + size).min(input.data.len());
        pieces.buffer().extend_from_slice(&input.data[offset..end]);
        offset = end;
        match pieces.parse() {
            Ok(None) if offset < input.data.len() => continue,
            Ok(Some((head, mut rest))) => {
                rest.extend_from_slice(&input.data[offset..]);
                break Ok(Some((head, rest)));
            }
            other => break other,
        }
    };
    // An incomplete head may be refused early or only once more arrives; a complete one must
    // read the same however it arrived.
    if matches!(at_once, Ok(Some(_))) || matches!(in_pieces, Ok(Some(_))) {
        assert_eq!(
            at_once.as_ref().ok(),
            in_pieces.as_ref().ok(),
            "reads split differently gave another head"
        );
    }
    if let Ok(Some((head, rest))) = at_once {
        assert!(
            input.data.ends_with(&rest),
            "bytes after the head were changed"
        );
        if validate_target(&head.target).is_ok() {
            let (host, port) = head
                .target
                .rsplit_once(':')
                .expect("accepted target without a port");
            assert!(!host.is_empty());
            assert!(
                port.parse::<u16>().is_ok_and(|p| p != 0),
                "accepted port {port:?}"
            );
        }
    }
});
