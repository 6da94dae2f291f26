//! `ChannelData::decode` on arbitrary bytes, and `frame_len` cutting the same bytes as a
//! TURN-over-TCP stream buffer into frames, each decoded as STUN and as ChannelData.
#![no_main]

#[allow(dead_code)]
#[path = "../common/exercise.rs"]
mod exercise;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    exercise::channel_data(data);
    exercise::stream(data);
});
