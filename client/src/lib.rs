//! Client for slotd (work in progress).
