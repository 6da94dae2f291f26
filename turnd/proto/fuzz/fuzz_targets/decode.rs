//! `Message::decode` on arbitrary bytes, then every attribute getter and every verifier on
//! whatever decodes (see `common/exercise.rs`).
#![no_main]

#[allow(dead_code)]
#[path = "../common/exercise.rs"]
mod exercise;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    exercise::stun(data);
});
