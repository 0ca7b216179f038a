//! basyn: copy and synchronize block devices and disk images, locally or over SSH.
//!
//! The binary (`main.rs`) parses the command line with [`cli`] and hands a [`engine::Plan`]
//! to [`engine::run`]; the far end of every run is [`serve::serve`] behind an
//! [`endpoint::Endpoint`]. `docs/design.md` draws the module map.

pub mod bitmap_file;
pub mod block;
pub mod changes;
pub mod cli;
pub mod compress;
pub mod device;
pub mod digest_index;
pub mod direct;
pub mod endpoint;
pub mod engine;
pub mod hash;
pub mod json;
pub mod leaf_reader;
pub mod lease;
pub mod link;
pub mod occupancy;
pub mod ordered;
pub mod piece_table;
pub mod protocol;
pub mod queue;
pub mod report;
pub mod restrict;
pub mod serve;
pub mod sparse;
pub mod ssh;
pub mod stamp;
pub mod stat_json;
pub mod state;
pub mod states;
pub mod sysfs;
pub mod thin;
pub mod tree;
