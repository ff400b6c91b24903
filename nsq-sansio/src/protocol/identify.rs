//! IDENTIFY: the JSON the client sends and the negotiated settings nsqd answers with.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Config;

/// The IDENTIFY body a client sends, built from its [`Config`].
#[derive(Debug, Clone, Serialize)]
pub(crate) struct IdentifyRequest<'a> {
    client_id: &'a str,
    hostname: &'a str,
    user_agent: &'a str,
    feature_negotiation: bool,
    /// Milliseconds; `-1` disables heartbeats.
    heartbeat_interval: i64,
    tls_v1: bool,
    snappy: bool,
    deflate: bool,
    deflate_level: u8,
    sample_rate: u8,
    /// Bytes; `-1` disables nsqd's output buffering.
    output_buffer_size: i64,
    /// Milliseconds; `-1` disables the flush timeout.
    output_buffer_timeout: i64,
    /// Milliseconds; `0` keeps nsqd's default.
    msg_timeout: u64,
    /// The topology hints are left out when empty: nsqd reads a missing key as empty, and an
    /// nsqd older than topology-aware delivery sees no key it does not know.
    #[serde(skip_serializing_if = "str::is_empty")]
    topology_region: &'a str,
    /// As `topology_region`.
    #[serde(skip_serializing_if = "str::is_empty")]
    topology_zone: &'a str,
}

impl<'a> IdentifyRequest<'a> {
    pub(crate) fn new(config: &'a Config) -> Self {
        Self {
            client_id: &config.client_id,
            hostname: &config.hostname,
            user_agent: &config.user_agent,
            feature_negotiation: true,
            heartbeat_interval: config.heartbeat_interval.map_or(-1, millis_i64),
            tls_v1: config.tls.enabled,
            snappy: config.snappy,
            deflate: config.deflate,
            deflate_level: config.deflate_level,
            sample_rate: config.sample_rate,
            output_buffer_size: config.output_buffer_size.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)),
            output_buffer_timeout: config.output_buffer_timeout.map_or(-1, millis_i64),
            msg_timeout: config.msg_timeout.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            topology_region: &config.topology_region,
            topology_zone: &config.topology_zone,
        }
    }

    /// The JSON body.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of strings, integers and booleans cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

fn millis_i64(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The settings nsqd negotiated, from its JSON answer to IDENTIFY.
///
/// Unknown keys are ignored, so newer nsqd versions parse too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct IdentifyResponse {
    /// The highest RDY count nsqd accepts.
    pub max_rdy_count: u64,
    /// nsqd's version.
    pub version: String,
    /// The highest `msg_timeout` (ms) a client may ask for.
    pub max_msg_timeout: u64,
    /// The message timeout (ms) in force for this connection.
    pub msg_timeout: u64,
    /// Whether nsqd will now upgrade the connection to TLS.
    pub tls_v1: bool,
    /// Whether nsqd will now switch to deflate.
    pub deflate: bool,
    /// The deflate level nsqd chose.
    pub deflate_level: u32,
    /// The highest deflate level nsqd allows.
    pub max_deflate_level: u32,
    /// Whether nsqd will now switch to snappy.
    pub snappy: bool,
    /// The sample rate in force (0 = every message).
    pub sample_rate: u32,
    /// Whether the client must send AUTH before other commands.
    pub auth_required: bool,
    /// nsqd's output buffer size for this connection, in bytes.
    pub output_buffer_size: i64,
    /// nsqd's output buffer timeout for this connection, in ms.
    pub output_buffer_timeout: i64,
    /// nsqd's `--topology-region` (empty when unset or from an nsqd without topology).
    pub topology_region: String,
    /// nsqd's `--topology-zone` (empty when unset or from an nsqd without topology).
    pub topology_zone: String,
}

impl IdentifyResponse {
    /// Parses nsqd's JSON answer to IDENTIFY.
    pub fn parse(data: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(data)
    }
}
