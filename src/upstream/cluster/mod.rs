//! Redis Cluster upstream (issue 13), being built in steps; `docs/cluster.md`
//! says which parts work. What is here: hash slots ([`slots`]), the
//! cluster's own command table with key specs and tips ([`commands`]), the
//! slot map and redirects ([`topology`]), the refresher keeping the
//! current map ([`view`]), and sending a request to its slot's owner
//! through MOVED/ASK/TRYAGAIN ([`router`]).
//! The session sends every upstream-bound command of a cluster client
//! through [`router::Router::execute`]; L1 is off with a cluster until each
//! master has its own invalidation feed.

pub mod commands;
pub mod router;
pub mod slots;
pub mod split;
pub mod topology;
pub mod view;
