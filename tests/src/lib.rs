//! Fake nsqd and nsqlookupd servers and the shared scenario suite.
