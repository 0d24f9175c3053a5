//! Arbitrary bytes decoded as `ClientMessage`s, converted and applied to a scheduler.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| slotd_fuzz::client_message(data));
