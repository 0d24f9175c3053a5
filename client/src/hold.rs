//! [`Hold`]: a stream that keeps a lease until the stream ends or is dropped.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures::Stream;
use pin_project_lite::pin_project;

use crate::Lease;

pin_project! {
    /// A stream (an SSE body, a token stream) wrapped with the [`Lease`] that covers it.
    ///
    /// The lease is released as soon as the inner stream yields `None`, or when the `Hold` is dropped,
    /// whichever comes first. Made by [`Lease::hold`].
    #[derive(Debug)]
    #[must_use = "streams do nothing unless polled, and dropping a Hold releases its lease"]
    pub struct Hold<S> {
        #[pin]
        stream: S,
        lease: Option<Lease>,
    }
}

impl Lease {
    /// Wraps `stream` so that the lease is held until the stream ends (yields `None`) or is dropped.
    pub fn hold<S>(self, stream: S) -> Hold<S> {
        Hold::new(self, stream)
    }
}

impl<S> Hold<S> {
    fn new(lease: Lease, stream: S) -> Self {
        Hold { stream, lease: Some(lease) }
    }

    /// The lease, while it is still held (`None` once the stream has ended).
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// The inner stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Splits into the inner stream and the lease (if still held), for example to release it with an
    /// explicit outcome.
    pub fn into_parts(self) -> (S, Option<Lease>) {
        (self.stream, self.lease)
    }
}

impl<S: Stream> Stream for Hold<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.project();
        let item = this.stream.poll_next(cx);
        if let Poll::Ready(None) = item {
            // Dropping the lease sends its release; later polls find nothing to release.
            this.lease.take();
        }
        item
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.stream.size_hint()
    }
}
