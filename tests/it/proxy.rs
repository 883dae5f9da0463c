//! A TCP proxy in front of the test PostgreSQL server that a test can cut and restore:
//! the database "going away" under a running daemon, without touching the server the
//! other tests share. Or freeze: stop forwarding without closing anything, as a firewall
//! that drops a connection silently does (no reset ever arrives).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub struct PgProxy {
    pub address: SocketAddr,
    up: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

impl PgProxy {
    /// A proxy to `target` (host:port), up.
    pub async fn start(target: String) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let frozen = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (accepting, tracked, holding) = (up.clone(), connections.clone(), frozen.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused
                }
                let (target, frozen) = (target.clone(), holding.clone());
                let task = tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(target).await {
                        let (from_client, to_client) = client.into_split();
                        let (from_server, to_server) = server.into_split();
                        tokio::join!(
                            pump(from_client, to_server, frozen.clone()),
                            pump(from_server, to_client, frozen),
                        );
                    }
                });
                tracked.lock().unwrap().push(task.abort_handle());
            }
        });
        PgProxy {
            address,
            up,
            frozen,
            connections,
        }
    }

    /// Every connection stops forwarding, in both directions, and nothing is closed: what
    /// a silently dropped connection looks like from each end.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// The database goes away: open connections are cut, new ones refused.
    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// The database is back.
    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// `url` (a PostgreSQL URL) pointed at this proxy.
    pub fn url_for(&self, url: &str) -> String {
        let mut url = reqwest::Url::parse(url).unwrap();
        url.set_ip_host(self.address.ip()).unwrap();
        url.set_port(Some(self.address.port())).unwrap();
        url.to_string()
    }
}

/// Forwards what `from` sends to `to`; while `frozen`, holds it (and reads nothing more),
/// closing nothing.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
