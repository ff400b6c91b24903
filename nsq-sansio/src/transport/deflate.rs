//! Raw deflate (RFC 1951) over `flate2::{Compress, Decompress}`, sync-flushed per write.
