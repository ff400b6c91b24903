//! ProducerState: publishes over one nsqd connection, responses matched FIFO.
