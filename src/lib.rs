//! nearcache: a Redis-protocol sidecar that serves hot keys from a shared
//! in-process L1, forwards everything else to the upstream Redis, and fills
//! configured misses from TDengine.
//!
//! Layers, outermost first: [`server`] accepts clients and owns their
//! connections; [`protocol`] frames requests and replies; [`command`] decides
//! what a request is; [`cache`] answers from L1 and keeps it consistent;
//! [`upstream`] talks to Redis; [`tdengine`] is the third tier; [`admin`] and
//! [`metrics`] serve operators.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod metrics;
pub mod tdengine;

pub use config::Config;
pub use error::{Error, Result};
