//! Random operation sequences and time advances against the scheduler core.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| slotd_fuzz::scheduler_ops(data));
