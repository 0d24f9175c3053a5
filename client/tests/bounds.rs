//! Compile-time checks: the public types can cross threads and tasks.

use slotd_client::{
    Acquire, AcquireBuilder, Client, ClientBuilder, Error, Hold, Lease, LeaseBody, LeaseHandle, LeaseLayer,
    LeaseService, Lost, Outcome, PauseInfo,
};

fn send_sync<T: Send + Sync>() {}
fn send<T: Send>() {}

#[test]
fn public_types_are_send_and_sync() {
    send_sync::<Client>();
    send_sync::<ClientBuilder>();
    send_sync::<AcquireBuilder>();
    send_sync::<Acquire>();
    send_sync::<Lease>();
    send_sync::<LeaseHandle>();
    send_sync::<Hold<futures::stream::Iter<std::vec::IntoIter<u8>>>>();
    send_sync::<LeaseBody<String>>();
    send_sync::<LeaseLayer<slotd_client::FixedPool>>();
    send_sync::<LeaseService<(), slotd_client::FixedPool>>();
    send_sync::<Error>();
    send_sync::<Lost>();
    send_sync::<Outcome>();
    send_sync::<PauseInfo>();
    send::<slotd_client::ResponseFuture<String>>();
}

#[test]
fn futures_are_send() {
    fn check<F: std::future::Future + Send>(_: F) {}
    #[allow(unused_must_use, clippy::let_underscore_future)]
    fn _never_called(c: Client, lease: Lease) {
        check(std::future::IntoFuture::into_future(c.acquire("p")));
        check(c.run("p", |_| async { Ok::<_, Error>(()) }));
        check(c.status(None));
        check(lease.release(Outcome::Ok));
    }
    let _ = _never_called as fn(Client, Lease);
}
