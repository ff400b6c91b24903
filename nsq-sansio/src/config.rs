//! Client configuration: every go-nsq option, by name or typed.

use std::time::Duration;

use crate::transport::TlsOptions;

/// Client configuration shared by every connection of a producer or consumer.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) dial_timeout: Duration,
    pub(crate) read_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub(crate) heartbeat_interval: Option<Duration>,
    pub(crate) client_id: String,
    pub(crate) hostname: String,
    pub(crate) user_agent: String,
    pub(crate) sample_rate: u8,
    pub(crate) deflate: bool,
    pub(crate) deflate_level: u8,
    pub(crate) snappy: bool,
    pub(crate) output_buffer_size: Option<u64>,
    pub(crate) output_buffer_timeout: Option<Duration>,
    pub(crate) max_in_flight: u32,
    pub(crate) msg_timeout: Option<Duration>,
    pub(crate) auth_secret: Option<String>,
    pub(crate) max_frame_size: u32,
    pub(crate) tls: TlsOptions,
    pub(crate) lookupd_poll_interval: Duration,
    pub(crate) lookupd_poll_jitter: f64,
    pub(crate) max_requeue_delay: Duration,
    pub(crate) default_requeue_delay: Duration,
    pub(crate) backoff_strategy: BackoffStrategy,
    pub(crate) max_backoff_duration: Duration,
    pub(crate) backoff_multiplier: Duration,
    pub(crate) max_attempts: u16,
    pub(crate) low_rdy_idle_timeout: Duration,
    pub(crate) low_rdy_timeout: Duration,
    pub(crate) rdy_redistribute_interval: Duration,
    pub(crate) rng_seed: u64,
}

/// How backoff durations grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackoffStrategy {
    /// `backoff_multiplier × 2^(level-1)`.
    #[default]
    Exponential,
    /// A random duration up to the exponential one.
    FullJitter,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            dial_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(1),
            heartbeat_interval: Some(Duration::from_secs(30)),
            client_id: String::new(),
            hostname: String::new(),
            user_agent: concat!("nsq-rs/", env!("CARGO_PKG_VERSION")).to_owned(),
            sample_rate: 0,
            deflate: false,
            deflate_level: 6,
            snappy: false,
            output_buffer_size: None,
            output_buffer_timeout: None,
            max_in_flight: 1,
            msg_timeout: None,
            auth_secret: None,
            max_frame_size: 16 * 1024 * 1024,
            tls: TlsOptions::default(),
            lookupd_poll_interval: Duration::from_secs(60),
            lookupd_poll_jitter: 0.3,
            max_requeue_delay: Duration::from_secs(15 * 60),
            default_requeue_delay: Duration::from_secs(90),
            backoff_strategy: BackoffStrategy::Exponential,
            max_backoff_duration: Duration::from_secs(120),
            backoff_multiplier: Duration::from_secs(1),
            max_attempts: 5,
            low_rdy_idle_timeout: Duration::from_secs(10),
            low_rdy_timeout: Duration::from_secs(30),
            rdy_redistribute_interval: Duration::from_secs(5),
            rng_seed: 0,
        }
    }
}

impl Config {
    /// A configuration with go-nsq's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets an option by its go-nsq name (temporary subset).
    pub fn set(&mut self, name: &str, value: &str) -> Result<&mut Self, String> {
        match name {
            "auth_secret" => self.auth_secret = Some(value.to_owned()),
            "tls_v1" => self.tls.enabled = value == "true",
            "max_in_flight" => self.max_in_flight = value.parse().map_err(|_| name.to_owned())?,
            "max_attempts" => self.max_attempts = value.parse().map_err(|_| name.to_owned())?,
            _ => return Err(name.to_owned()),
        }
        Ok(self)
    }
}
