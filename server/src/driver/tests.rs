//! Driver tests under paused time: in-process channels, no sockets.
