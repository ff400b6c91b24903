//! NSQ producer and consumer on the smol runtime (work in progress).
