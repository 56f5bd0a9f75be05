//! `cargo fuzz run receive`: the webhook receive path (verify, then parse the envelope) on
//! arbitrary header values and bodies. The logic lives in `tests/support/fuzz_receive.rs`,
//! which `cargo test` also runs over random inputs (`tests/properties.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/support/fuzz_receive.rs"]
mod fuzz_receive;

fuzz_target!(|data: &[u8]| fuzz_receive::receive(data));
