//! Redis Cluster upstream (issue 13), being built in steps; `docs/cluster.md`
//! says which parts work. What is here: hash slots ([`slots`]), the
//! cluster's own command table with key specs and tips ([`commands`]), the
//! slot map and redirects ([`topology`]), the refresher keeping the
//! current map ([`view`]), and sending a request to its slot's owner
//! through MOVED/ASK/TRYAGAIN ([`router`]).
//! The session sends a cluster client's upstream-bound commands through
//! the [`router::Router`]; L1 is kept by one invalidation feed per master
//! (`cache/cluster_feed.rs`).

pub mod commands;
pub mod router;
pub mod slots;
pub mod split;
pub mod topology;
pub mod view;

use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::error::Error;
use crate::net::FrameReader;
use crate::protocol::Reply;
use crate::upstream::{Connector, Login, ServerInfo};

/// `requests` written at once on a connection of their own to `addr`, as
/// nearcache's configured user, and their replies in order; the whole
/// exchange bounded by `connect_timeout + command_timeout`, after which
/// the error is `late(limit)`. For what a shared multiplexed connection
/// cannot do: ask a node that has no pool (the slot map, the command
/// table), or keep two requests adjacent (`ASKING` and its command).
pub(crate) async fn exchange(
    connector: &Connector,
    addr: &str,
    proto: u8,
    requests: &[Bytes],
    late: impl FnOnce(Duration) -> String,
) -> Result<Vec<Reply>, Error> {
    exchange_with(connector, addr, proto, |_| requests.to_vec(), late).await
}

/// [`exchange`] with requests chosen once the node's handshake says what
/// it is (its version, say).
pub(crate) async fn exchange_with(
    connector: &Connector,
    addr: &str,
    proto: u8,
    requests: impl FnOnce(&ServerInfo) -> Vec<Bytes>,
    late: impl FnOnce(Duration) -> String,
) -> Result<Vec<Reply>, Error> {
    let cfg = connector.config();
    let limit = cfg.connect_timeout + cfg.command_timeout;
    let once = async {
        let c = connector
            .connect_to(addr, proto, &Login::Configured, false)
            .await?;
        let requests = requests(&c.info);
        let mut stream = c.stream;
        stream
            .write_all(&requests.concat())
            .await
            .map_err(|e| Error::upstream_io(&e))?;
        let mut reader = FrameReader::new(stream, c.leftover);
        let mut replies = Vec::with_capacity(requests.len());
        for _ in &requests {
            replies.push(reader.next().await?);
        }
        Ok(replies)
    };
    match tokio::time::timeout(limit, once).await {
        Ok(r) => r,
        Err(_) => Err(Error::Upstream(late(limit))),
    }
}
