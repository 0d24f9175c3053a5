//! [`TcpProxy`]: a loopback TCP relay that a test can cut and heal, to partition one process from
//! another (a slotd member from etcd) while everything else still reaches both.
//!
//! Plain threads, no runtime: it keeps relaying while the test's runtime is busy or blocked, and it
//! works from synchronous helpers as well as from async tests.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

/// How long the relay waits for the upstream to accept a connection.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bytes copied per read.
const CHUNK: usize = 16 * 1024;

/// Relays every connection to `127.0.0.1:PORT` (its [`TcpProxy::url`]) to an upstream address.
///
/// [`cut`](Self::cut) shuts every relayed connection down at once and blackholes new ones: they are
/// accepted (a connect succeeds, as it does towards a host behind a dead link) and then never
/// answered, so the peer only notices through its own timeouts. [`silence`](Self::silence) is the
/// quieter partition: the relayed connections stay open but every byte on them is dropped, and new
/// ones are blackholed, so nothing tells either side that the link is gone. [`heal`](Self::heal)
/// relays again and closes the blackholed (and silenced) connections, so their peers reconnect.
/// Dropping the proxy closes everything.
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    cut: AtomicBool,
    /// Relayed connections drop every byte (set with `cut`).
    silent: AtomicBool,
    stopped: AtomicBool,
    /// Both ends of every relayed connection (clones), shut down on a cut.
    relayed: Mutex<Vec<TcpStream>>,
    /// Connections accepted while cut: held open, never read.
    blackholed: Mutex<Vec<TcpStream>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn close_all(streams: &Mutex<Vec<TcpStream>>) {
    for s in lock(streams).drain(..) {
        let _ = s.shutdown(Shutdown::Both);
    }
}

impl TcpProxy {
    /// Listens on an ephemeral loopback port and relays to `upstream`.
    #[track_caller]
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared::default());
        let accepting = shared.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if accepting.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                if accepting.cut.load(Ordering::SeqCst) {
                    lock(&accepting.blackholed).push(conn);
                    continue;
                }
                let shared = accepting.clone();
                thread::spawn(move || relay(conn, upstream, shared));
            }
        });
        TcpProxy { addr, shared }
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` + [`addr`](Self::addr).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts every relayed connection down and blackholes new ones until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        close_all(&self.shared.relayed);
    }

    /// Drops every byte on the relayed connections, without closing them, and blackholes new ones
    /// until [`heal`](Self::heal).
    pub fn silence(&self) {
        self.shared.silent.store(true, Ordering::SeqCst);
        self.shared.cut.store(true, Ordering::SeqCst);
    }

    /// Relays new connections again and closes the blackholed ones (and, after
    /// [`silence`](Self::silence), the silenced ones: bytes were lost on them).
    pub fn heal(&self) {
        if self.shared.silent.swap(false, Ordering::SeqCst) {
            close_all(&self.shared.relayed);
        }
        self.shared.cut.store(false, Ordering::SeqCst);
        close_all(&self.shared.blackholed);
    }

    /// True between [`cut`](Self::cut) and [`heal`](Self::heal).
    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        close_all(&self.shared.relayed);
        close_all(&self.shared.blackholed);
        // Wake the accept loop so that it sees `stopped` and ends.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
    }
}

/// Pipes `down` <-> a new connection to `upstream` until either side ends or the proxy is cut.
fn relay(down: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let Ok(up) = TcpStream::connect_timeout(&upstream, UPSTREAM_CONNECT_TIMEOUT) else {
        // Nothing listens upstream (etcd stopped, say): the peer sees its connection closed.
        return;
    };
    let _ = (down.set_nodelay(true), up.set_nodelay(true));
    let clones = (down.try_clone(), up.try_clone(), down.try_clone(), up.try_clone());
    let (Ok(d1), Ok(u1), Ok(d2), Ok(u2)) = clones else { return };
    {
        let mut relayed = lock(&shared.relayed);
        // A cut between accept and here must not leave this one relaying.
        if shared.cut.load(Ordering::SeqCst) || shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        relayed.push(d1);
        relayed.push(u1);
    }
    let back = {
        let shared = shared.clone();
        thread::spawn(move || pipe(u2, d2, &shared))
    };
    pipe(down, up, &shared);
    let _ = back.join();
}

/// Copies `from` to `to` (dropping the bytes while silenced) until `from` ends or fails, then shuts
/// both down.
fn pipe(mut from: TcpStream, mut to: TcpStream, shared: &Shared) {
    let mut buf = vec![0; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) if shared.silent.load(Ordering::SeqCst) => {}
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = io::Write::flush(&mut to);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                thread::spawn(move || {
                    let mut buf = [0; 64];
                    while let Ok(n @ 1..) = c.read(&mut buf) {
                        if c.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn round_trip(c: &mut TcpStream) -> io::Result<Vec<u8>> {
        c.write_all(b"ping")?;
        let mut buf = [0; 4];
        c.read_exact(&mut buf)?;
        Ok(buf.to_vec())
    }

    #[test]
    fn relays_cuts_blackholes_and_heals() {
        let proxy = TcpProxy::start(echo_server());
        let mut c = TcpStream::connect(proxy.addr()).expect("connect");
        c.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        assert_eq!(round_trip(&mut c).expect("relayed"), b"ping");

        proxy.cut();
        assert!(proxy.is_cut());
        // The relayed connection is closed: a read ends (0 bytes or an error), it never echoes.
        assert!(round_trip(&mut c).is_err(), "a cut connection still relays");
        // A new one connects but is never answered.
        let mut held = TcpStream::connect(proxy.addr()).expect("a connect still succeeds");
        held.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let e = round_trip(&mut held).expect_err("a blackholed connection answered");
        assert!(matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{e}");

        proxy.heal();
        let mut fresh = TcpStream::connect(proxy.addr()).expect("connect");
        fresh.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        assert_eq!(round_trip(&mut fresh).expect("relayed after heal"), b"ping");

        // Silenced: the connection stays open, nothing gets through.
        proxy.silence();
        fresh.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let e = round_trip(&mut fresh).expect_err("a silenced connection answered");
        assert!(matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{e}");
        proxy.heal();
        let mut again = TcpStream::connect(proxy.addr()).expect("connect");
        again.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        assert_eq!(round_trip(&mut again).expect("relayed after heal"), b"ping");
    }
}
