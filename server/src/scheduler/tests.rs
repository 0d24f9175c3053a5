//! Scheduler unit tests with explicit instants.
