//! ConsumerState: one topic/channel across many nsqd connections.
