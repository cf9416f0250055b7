//! The one Redis connection type every process uses: a single node (a reconnecting
//! [`ConnectionManager`]) or a Redis Cluster (the redis crate's cluster client, which follows
//! MOVED/ASK redirections and failovers on its own).
//!
//! Every key of a deployment carries the namespace as its hash tag
//! ([`crate::topology::Names::key_prefix`]), so on a cluster all of them live in one slot: every
//! script and every `MULTI` touches one node, as Redis Cluster requires. Commands that name no
//! key (`SCAN`, `INFO`, `PING`, `DBSIZE`...) are sent to the master of that slot, the node
//! that holds the deployment's keys, not to a random node.
//!
//! It owns routing only; it never builds key names and never retries on its own (the
//! callers' backoff does).

use redis::{
    Cmd, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager},
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
};

/// Commands without keys that must reach the node holding the deployment's keys.
const KEYLESS: &[&[u8]] = &[
    b"SCAN", b"INFO", b"PING", b"DBSIZE", b"KEYS", b"MEMORY", b"CONFIG", b"TIME",
];

/// A connection to one Redis node or to a Redis Cluster; cheap to clone (clones share the
/// underlying connections).
#[derive(Clone)]
pub enum RedisConn {
    /// One Redis node.
    Node(ConnectionManager),
    /// A Redis Cluster; `home` is a key of the deployment's slot.
    Cluster {
        /// The cluster client's connection.
        conn: ClusterConnection,
        /// A key in the deployment's hash slot (its namespace tag).
        home: std::sync::Arc<str>,
    },
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Node(_) => f.write_str("RedisConn::Node"),
            Self::Cluster { home, .. } => write!(f, "RedisConn::Cluster({home})"),
        }
    }
}

impl RedisConn {
    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }
}

fn name_of(cmd: &Cmd) -> Option<Vec<u8>> {
    match cmd.args_iter().next()? {
        redis::Arg::Simple(bytes) => Some(bytes.to_ascii_uppercase()),
        _ => None,
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster { conn, home } => {
                let keyless = name_of(cmd).is_some_and(|n| KEYLESS.contains(&n.as_slice()));
                if keyless {
                    let route = Route::with_key(home.as_bytes(), SlotAddr::Master);
                    let routing =
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                    Box::pin(conn.route_command(cmd.clone(), routing))
                } else {
                    conn.req_packed_command(cmd)
                }
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster { conn, .. } => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            Self::Cluster { conn, .. } => conn.get_db(),
        }
    }
}
