//! Redis Cluster upstream (issue 13), being built in steps; `docs/cluster.md`
//! says which parts work. What is here: hash slots ([`slots`]), the
//! cluster's own command table with key specs and tips ([`commands`]), the
//! slot map and redirects ([`topology`]), the refresher keeping the
//! current map ([`view`]), and sending a request to its slot's owner
//! through MOVED/ASK/TRYAGAIN ([`router`]).
//! Routing is not wired into the request path yet, so `nearcache::start`
//! refuses a `redis-cluster://` upstream rather than treat a cluster node
//! as a single Redis (its clients would see MOVED errors).

pub mod commands;
pub mod router;
pub mod slots;
pub mod split;
pub mod topology;
pub mod view;
