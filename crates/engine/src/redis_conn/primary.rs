//! The connection to one primary: a single node at a fixed address, or the primary a set of Redis
//! Sentinels names. One multiplexed connection, made again when a failover shows: a connection
//! that broke (a reset, a primary that died), a `READONLY` answer (a write that reached a primary
//! demoted to replica), or the sentinels' `+switch-master` announcement (a graceful failover,
//! where the old primary keeps taking writes, to be thrown away, until the sentinels reconfigure
//! it many seconds later). Connecting again asks the sentinels afresh, so everything on this
//! connection (key lookups, the limiter, usage, key writes) moves to the new primary on its own,
//! without a restart. The `redis` crate has Sentinel lookups (`SentinelClient`) but no connection
//! that follows them, and its `ConnectionManager` reconnects only to the address it started with.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, Shared};
use futures_util::{FutureExt, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::sentinel::SentinelClient;
use redis::{AsyncConnectionConfig, RedisError, RedisResult};
use tokio::sync::watch;

use crate::event::RedisReconnect;
use crate::observe::Observer;

/// A failed connection is not tried again by requests sooner than this after it was started:
/// while a primary is down, requests fail at once instead of each paying for a connect; the
/// breaker's probe keeps trying at its own pace.
const RETRY_GAP: Duration = Duration::from_millis(100);
/// The sentinels' channel announcing a new primary: `<name> <old ip> <old port> <new ip> <new port>`.
const SWITCH_MASTER: &str = "+switch-master";
/// How often a quiet subscription to the sentinels is PINGed, and the wait before subscribing
/// again when no sentinel answers.
const SENTINEL_PING_EVERY: Duration = Duration::from_secs(2);

/// Where the primary is.
pub enum Locate {
    /// One node; a DNS name is resolved again on every connect.
    Node(redis::Client),
    /// The primary the sentinels name under `master_name` (a lookup checks with `ROLE` that it is
    /// one).
    Sentinel {
        client: tokio::sync::Mutex<SentinelClient>,
        master_name: String,
    },
}

impl Locate {
    async fn client(&self) -> RedisResult<redis::Client> {
        match self {
            Locate::Node(c) => Ok(c.clone()),
            Locate::Sentinel { client, .. } => client.lock().await.async_get_client().await,
        }
    }
}

/// The primary's address and a connection to it.
#[derive(Clone)]
struct Connected {
    conn: MultiplexedConnection,
    addr: Arc<str>,
}

/// One attempt to reach the primary, shared by every request waiting on it.
struct Link {
    id: u64,
    started: Instant,
    connected: Shared<BoxFuture<'static, RedisResult<Connected>>>,
}

pub struct Primary {
    locate: Locate,
    config: AsyncConnectionConfig,
    /// Bounds one whole attempt: the sentinel lookup, the role check and the connect.
    attempt_timeout: Duration,
    link: RwLock<Arc<Link>>,
    next_id: AtomicU64,
    /// The primary last connected to (another one is a failover), for those that must follow
    /// it too (the key-events subscription).
    addr: watch::Sender<Option<Arc<str>>>,
    db: i64,
    observer: Arc<Observer>,
}

impl Primary {
    /// Starts connecting in the background; requests wait for it (within their own timeout).
    pub fn start(
        locate: Locate,
        config: AsyncConnectionConfig,
        attempt_timeout: Duration,
        db: i64,
        observer: Arc<Observer>,
    ) -> Arc<Self> {
        let this = Arc::new_cyclic(|weak: &std::sync::Weak<Primary>| {
            let weak = weak.clone();
            let first: BoxFuture<'static, RedisResult<Connected>> = Box::pin(async move {
                match weak.upgrade() {
                    Some(p) => p.connect(None).await,
                    None => Err(gone()),
                }
            });
            Primary {
                locate,
                config,
                attempt_timeout,
                link: RwLock::new(Arc::new(Link {
                    id: 0,
                    started: Instant::now(),
                    connected: first.shared(),
                })),
                next_id: AtomicU64::new(1),
                addr: watch::Sender::new(None),
                db,
                observer,
            }
        });
        tokio::spawn(this.current().connected.clone().map(drop));
        if matches!(this.locate, Locate::Sentinel { .. }) {
            tokio::spawn(follow_switches(Arc::downgrade(&this)));
        }
        this
    }

    /// The primary's address each time it changes (`None` until first connected).
    pub fn changes(&self) -> watch::Receiver<Option<Arc<str>>> {
        self.addr.subscribe()
    }

    pub fn db(&self) -> i64 {
        self.db
    }

    /// Where the primary is now, asked afresh (of the sentinels, with Sentinel).
    pub async fn locate(&self) -> RedisResult<redis::Client> {
        tokio::time::timeout(self.attempt_timeout, self.locate.client())
            .await
            .unwrap_or_else(|_| Err(timed_out("locating the primary")))
    }

    fn current(&self) -> Arc<Link> {
        self.link.read().expect("link lock").clone()
    }

    /// Replaces the link `failed` with a new attempt, unless another caller did already; returns
    /// the link to use now.
    fn replace(self: &Arc<Self>, failed: u64, cause: RedisReconnect) -> Arc<Link> {
        let mut link = self.link.write().expect("link lock");
        if link.id != failed {
            return link.clone();
        }
        let this = self.clone();
        let attempt: BoxFuture<'static, RedisResult<Connected>> =
            Box::pin(async move { this.connect(Some(cause)).await });
        let next = Arc::new(Link {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            started: Instant::now(),
            connected: attempt.shared(),
        });
        // Runs to the end even if every request waiting on it gives up first.
        tokio::spawn(next.connected.clone().map(drop));
        *link = next.clone();
        next
    }

    /// One attempt: find the primary, connect, and report a new primary or a reconnect.
    async fn connect(&self, cause: Option<RedisReconnect>) -> RedisResult<Connected> {
        let attempt = async {
            let client = self.locate.client().await?;
            let addr: Arc<str> = client.get_connection_info().addr().to_string().into();
            let conn = client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await?;
            Ok::<_, RedisError>(Connected { conn, addr })
        };
        let connected = tokio::time::timeout(self.attempt_timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(timed_out("connecting to the primary")))?;
        let before = self.addr.send_replace(Some(connected.addr.clone()));
        match (before, cause) {
            (Some(before), _) if before != connected.addr => {
                self.observer.redis_reconnected(
                    RedisReconnect::Failover,
                    Some(&before),
                    &connected.addr,
                );
            }
            (_, Some(cause)) => self
                .observer
                .redis_reconnected(cause, None, &connected.addr),
            _ => {}
        }
        Ok(connected)
    }

    /// A connection to the primary: the current one, or a new attempt when the last one failed
    /// more than [`RETRY_GAP`] ago.
    async fn connection(self: &Arc<Self>) -> RedisResult<(u64, MultiplexedConnection)> {
        let mut link = self.current();
        if let Some(Err(e)) = link.connected.peek() {
            if link.started.elapsed() < RETRY_GAP {
                return Err(e.clone());
            }
            link = self.replace(link.id, RedisReconnect::ConnectionLost);
        }
        let c = link.connected.clone().await?;
        Ok((link.id, c.conn))
    }

    /// Runs `request` on the primary. When its answer shows a failover (the connection broke,
    /// or the node is a replica now), the connection is made again, asking the sentinels anew,
    /// and `request` is sent once more, to the new primary. A failover costs the requests in
    /// flight nothing but that wait.
    pub async fn request<T, F, Fut>(self: &Arc<Self>, request: F) -> RedisResult<T>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (id, conn) = self.connection().await?;
        match request(conn).await {
            Err(e) => match failover_signal(&e) {
                Some(cause) => {
                    let link = self.replace(id, cause);
                    let c = link.connected.clone().await?;
                    request(c.conn).await
                }
                None => Err(e),
            },
            ok => ok,
        }
    }

    /// A PING to the primary. `ask_sentinels` (the breaker's probe): with Sentinel, first ask
    /// them where the primary is now, and move there if it changed, so that the probe passes only
    /// once a primary that takes commands answers. Without it (the health check every few
    /// seconds, on every replica) the sentinels are not asked: their `+switch-master` and the
    /// connection's own failover signals move it.
    pub async fn ping(self: &Arc<Self>, ask_sentinels: bool) -> RedisResult<()> {
        let link = self.current();
        let settled = link.connected.peek().cloned();
        let moved = match (&settled, &self.locate) {
            // Still connecting: wait for that attempt below.
            (None, _) => false,
            (Some(Err(_)), _) => true,
            (Some(Ok(c)), Locate::Sentinel { .. }) if ask_sentinels => {
                let now = self.locate().await?;
                now.get_connection_info().addr().to_string() != *c.addr
            }
            (Some(Ok(_)), _) => false,
        };
        if moved {
            self.replace(link.id, RedisReconnect::ConnectionLost);
        }
        self.request(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(drop)
    }
}

/// Listens to the sentinels' `+switch-master` for as long as the primary lives, and connects
/// again (asking the sentinels) when they announce a new primary under this name.
async fn follow_switches(primary: Weak<Primary>) {
    loop {
        let Some(p) = primary.upgrade() else { return };
        let Locate::Sentinel { client, .. } = &p.locate else {
            return;
        };
        let subscribed = async {
            let client = client.lock().await.async_get_sentinel_client().await?;
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(SWITCH_MASTER).await?;
            Ok::<_, RedisError>(ps)
        };
        let ps = tokio::time::timeout(p.attempt_timeout, subscribed).await;
        drop(p);
        let Ok(Ok(ps)) = ps else {
            tracing::debug!("No sentinel takes a subscription to +switch-master; retrying.");
            tokio::time::sleep(SENTINEL_PING_EVERY).await;
            continue;
        };
        let (mut sink, mut messages) = ps.split();
        let mut ping = tokio::time::interval(SENTINEL_PING_EVERY);
        ping.reset();
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { break };
                    let Some(p) = primary.upgrade() else { return };
                    let text: String = msg.get_payload().unwrap_or_default();
                    if let Locate::Sentinel { master_name, .. } = &p.locate
                        && text.split(' ').next() == Some(master_name.as_str())
                    {
                        let link = p.current();
                        p.replace(link.id, RedisReconnect::ConnectionLost);
                    }
                }
                _ = ping.tick() => {
                    if primary.strong_count() == 0 {
                        return;
                    }
                    let pong = tokio::time::timeout(SENTINEL_PING_EVERY, sink.ping::<redis::Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
    }
}

/// Why an error means the primary moved or the connection must be made again, if it does. A
/// timeout does not: a stalled primary is the breaker's business, not a failover.
fn failover_signal(e: &RedisError) -> Option<RedisReconnect> {
    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly) {
        Some(RedisReconnect::Readonly)
    } else if e.is_unrecoverable_error() {
        Some(RedisReconnect::ConnectionLost)
    } else {
        None
    }
}

fn timed_out(what: &str) -> RedisError {
    RedisError::from((redis::ErrorKind::Io, "timed out", what.to_owned()))
}

fn gone() -> RedisError {
    RedisError::from((redis::ErrorKind::Client, "the Redis connection was dropped"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demoted_primary_or_a_broken_connection_is_a_failover_a_timeout_is_not() {
        let readonly = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        assert_eq!(failover_signal(&readonly), Some(RedisReconnect::Readonly));
        let reset = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(
            failover_signal(&reset),
            Some(RedisReconnect::ConnectionLost)
        );
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(
            failover_signal(&refused),
            Some(RedisReconnect::ConnectionLost)
        );
        let slow = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(failover_signal(&slow), None);
        let wrong = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "ERR",
        ));
        assert_eq!(failover_signal(&wrong), None);
    }
}
