//! The snappy framing format nsqd speaks, over `snap::raw`.
