//! The end-to-end suites of slotd live in this package's test targets (`tests/*.rs`, one per concern,
//! run with `cargo test -p slotd-tests --test NAME`); their shared helpers are in `slotd-test-support`.
