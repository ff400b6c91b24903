//! NSQ producer and consumer on the tokio runtime (work in progress).
