//! A TCP proxy in front of the test PostgreSQL server that a test can cut and restore:
//! the database "going away" under a running daemon, without touching the server the
//! other tests share.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub struct PgProxy {
    pub address: SocketAddr,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

impl PgProxy {
    /// A proxy to `target` (host:port), up.
    pub async fn start(target: String) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (accepting, tracked) = (up.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                tracked.lock().unwrap().push(task.abort_handle());
            }
        });
        PgProxy {
            address,
            up,
            connections,
        }
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
