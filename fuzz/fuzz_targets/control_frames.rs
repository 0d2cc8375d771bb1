//! Arbitrary bytes fed in arbitrary pieces to the control-frame decoder, as client messages
//! (what the server reads) and server messages (what a client reads): never a panic, never a
//! buffer beyond the frame limit, and whatever decodes re-encodes to a decodable frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2p_voice::protocol::{encode_frame, ClientMsg, FrameDecoder, ServerMsg, MAX_FRAME_LEN};

fn run<T: serde::de::DeserializeOwned + serde::Serialize>(data: &[u8]) {
    let mut dec = FrameDecoder::new();
    // The first byte picks the chunk size, like reads of different sizes from a socket.
    let chunk = usize::from(*data.first().unwrap_or(&1)).max(1);
    for piece in data.chunks(chunk) {
        let take = piece.len().min(dec.wanted());
        dec.push(&piece[..take]);
        assert!(dec.buffered() <= 4 + MAX_FRAME_LEN);
        loop {
            match dec.next::<T>() {
                Ok(Some(msg)) => {
                    let frame = encode_frame(&msg).expect("a decoded message re-encodes");
                    let mut again = FrameDecoder::new();
                    again.push(&frame);
                    assert!(matches!(again.next::<T>(), Ok(Some(_))));
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    run::<ClientMsg>(data);
    run::<ServerMsg>(data);
});
