//! Property tests of the parsers that take outside input (a client's or a guest's
//! bytes): Connect envelopes, `Connect-Timeout-Ms`, and envd's JSON messages. None may
//! panic, hang, or allocate by what a peer declares rather than what it sent. Tier:
//! unprivileged.

use kiln_proto::connect::{
    decode_envelopes, encode_envelope, parse_timeout_ms, EnvelopeDecoder, EnvelopeError,
};
use proptest::prelude::*;

const MAX: usize = 64 * 1024;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes decode to envelopes or a typed error, never a panic.
    #[test]
    fn any_bytes_decode_or_fail_cleanly(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_envelopes(&body, MAX);
    }

    /// What we encode decodes to the same payloads, however the bytes are split
    /// into chunks on the wire.
    #[test]
    fn envelopes_round_trip_across_any_chunking(
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..512), 0..8),
        cuts in proptest::collection::vec(1usize..64, 0..32),
    ) {
        let mut wire = Vec::new();
        for p in &payloads {
            wire.extend_from_slice(&encode_envelope(0, p));
        }
        let mut decoder = EnvelopeDecoder::new(MAX);
        let mut got = Vec::new();
        let mut rest = &wire[..];
        let mut cuts = cuts.into_iter();
        while !rest.is_empty() {
            let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
            decoder.push(&rest[..n]);
            rest = &rest[n..];
            while let Some(env) = decoder.next_envelope().unwrap() {
                got.push(env.payload.to_vec());
            }
        }
        decoder.finish().unwrap();
        prop_assert_eq!(got, payloads);
    }

    /// A declared length above the limit is refused from the 5-byte header alone:
    /// nothing waits for (or buffers toward) gigabytes a peer only announced.
    #[test]
    fn declared_sizes_above_the_limit_fail_at_the_header(len in (MAX as u32 + 1)..=u32::MAX, flags in 0u8..2) {
        let mut header = vec![flags];
        header.extend_from_slice(&len.to_be_bytes());
        let mut decoder = EnvelopeDecoder::new(MAX);
        decoder.push(&header);
        prop_assert_eq!(
            decoder.next_envelope(),
            Err(EnvelopeError::TooLarge { len: len as usize, max: MAX })
        );
    }

    /// Any header value parses to a duration or a typed error.
    #[test]
    fn timeout_header_never_panics(value in ".{0,40}") {
        let _ = parse_timeout_ms(&value);
    }

    /// envd's request messages from arbitrary JSON text: parsed or refused.
    #[test]
    fn envd_messages_from_arbitrary_json(text in ".{0,300}") {
        let _ = serde_json::from_str::<kiln_proto::process::StartRequest>(&text);
        let _ = serde_json::from_str::<kiln_proto::process::ConnectRequest>(&text);
        let _ = serde_json::from_str::<kiln_proto::process::SendInputRequest>(&text);
        let _ = serde_json::from_str::<kiln_proto::filesystem::MoveRequest>(&text);
        let _ = serde_json::from_str::<kiln_proto::filesystem::ListDirRequest>(&text);
        let _ = serde_json::from_str::<kiln_proto::filesystem::WatchDirRequest>(&text);
        let _ = serde_json::from_str::<kiln_proto::InitRequest>(&text);
    }

    /// The same, from JSON shaped like the real messages with random leaves.
    #[test]
    fn envd_messages_from_json_shaped_input(
        cmd in ".{0,20}",
        args in proptest::collection::vec(".{0,10}", 0..4),
        pid in any::<i64>(),
        depth in any::<i64>(),
        data in ".{0,30}",
    ) {
        let start = serde_json::json!({"process": {"cmd": cmd, "args": args, "envs": {"A": data}},
            "pty": {"size": {"cols": pid, "rows": depth}}, "stdin": true});
        let _ = serde_json::from_value::<kiln_proto::process::StartRequest>(start);
        let input = serde_json::json!({"process": {"pid": pid}, "input": {"stdin": data}});
        let _ = serde_json::from_value::<kiln_proto::process::SendInputRequest>(input);
        let list = serde_json::json!({"path": data, "depth": depth});
        let _ = serde_json::from_value::<kiln_proto::filesystem::ListDirRequest>(list);
    }
}
