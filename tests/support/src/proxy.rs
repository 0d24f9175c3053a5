//! A TCP proxy in front of a daemon whose live connections a test can cut (reconnect tests).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// Forwards 127.0.0.1:<port> to the daemon; [`Proxy::cut`] drops every live connection (new ones
/// still work).
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards every connection to `target`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it resolves drops the listener; nothing else was started.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let c = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let Ok(mut outbound) = TcpStream::connect(target).await else { continue };
                let task = tokio::spawn(async move {
                    let _ = copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                c.lock().expect("proxy lock").push(task);
            }
        });
        Proxy { addr, conns, accept }
    }

    /// The proxy's URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every live connection.
    pub fn cut(&self) {
        for task in self.conns.lock().expect("proxy lock").drain(..) {
            task.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
