//! A `Server` driven by a scenario parsed from the input (`common/driver.rs`): signed TURN
//! requests, corrupted and raw datagrams from four 5-tuples, peer datagrams, time steps,
//! connection closes, and relay requests answered with fake relay addresses (or refused, or
//! answered late). Afterwards every 5-tuple must still get its Binding answered, and once all
//! lifetimes have run out no allocation, relay socket or quota slot may be left.
#![no_main]

#[allow(dead_code)]
#[path = "../common/driver.rs"]
mod driver;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (setup, ops) = driver::parse_ops(data);
    let mut d = driver::Driver::new(setup);
    d.run(&ops);
    d.finish();
});
