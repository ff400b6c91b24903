//! NSQ producer and consumer on the async-std runtime (work in progress).
