//! Client configuration: every go-nsq option, with go-nsq's names, defaults and ranges.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::connection::DEFAULT_MAX_MSG_SIZE;
use crate::error::CommandError;
use crate::transport::{TlsOptions, TlsVersion};

/// Why an option was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No option has this name.
    #[error("unknown option {0:?}")]
    UnknownOption(String),
    /// The value does not parse as the option's type.
    #[error("invalid value {value:?} for {option}: expected {expected}")]
    InvalidValue {
        /// The option.
        option: &'static str,
        /// The refused value.
        value: String,
        /// What the option takes.
        expected: &'static str,
    },
    /// The value is outside the option's range.
    #[error("{option} = {value} is out of range {range}")]
    OutOfRange {
        /// The option.
        option: &'static str,
        /// The refused value.
        value: String,
        /// The allowed range.
        range: &'static str,
    },
    /// Options that cannot be combined.
    #[error("invalid combination: {0}")]
    Conflict(String),
}

/// How backoff durations grow (go-nsq's `backoff_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BackoffStrategy {
    /// `backoff_multiplier × 2^level` (`"exponential"`, the default).
    #[default]
    Exponential,
    /// A uniform random duration in `[0, backoff_multiplier × 2^level)` (`"full_jitter"`).
    FullJitter,
}

/// Client configuration shared by every connection of a producer or consumer.
///
/// Every go-nsq option is here with go-nsq's default and valid range, settable by its go-nsq
/// name from text ([`Config::set`]) or with a typed setter of the same name; both run the same
/// check.
///
/// ```
/// use std::time::Duration;
/// use nsq_sansio::{Config, ConfigError};
///
/// let mut config = Config::new();
/// config.set("max_in_flight", "200")?.set("heartbeat_interval", "30s")?.set("snappy", "true")?;
/// config.max_attempts(10).read_timeout(Duration::from_secs(90))?;
/// assert!(matches!(config.set("max_in_flight", "many"), Err(ConfigError::InvalidValue { .. })));
/// assert!(matches!(config.set("read_timeout", "10m"), Err(ConfigError::OutOfRange { .. })));
/// config.validate()?;
/// # Ok::<(), ConfigError>(())
/// ```
///
/// `client_id` and `hostname` default to empty here (the core reads nothing from the OS); the
/// runtime crates fill them with the machine's host name, as go-nsq does.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) dial_timeout: Duration,
    pub(crate) read_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub(crate) local_addr: Option<SocketAddr>,
    pub(crate) lookupd_poll_interval: Duration,
    pub(crate) lookupd_poll_jitter: f64,
    pub(crate) lookupd_poll_timeout: Duration,
    pub(crate) max_requeue_delay: Duration,
    pub(crate) default_requeue_delay: Duration,
    pub(crate) backoff_strategy: BackoffStrategy,
    pub(crate) max_backoff_duration: Duration,
    pub(crate) backoff_multiplier: Duration,
    pub(crate) max_attempts: u16,
    pub(crate) low_rdy_idle_timeout: Duration,
    pub(crate) low_rdy_timeout: Duration,
    pub(crate) rdy_redistribute_interval: Duration,
    pub(crate) client_id: String,
    pub(crate) hostname: String,
    pub(crate) user_agent: String,
    pub(crate) topology_region: String,
    pub(crate) topology_zone: String,
    /// `None`: heartbeats disabled (sent as -1).
    pub(crate) heartbeat_interval: Option<Duration>,
    pub(crate) sample_rate: u8,
    pub(crate) tls: TlsOptions,
    pub(crate) deflate: bool,
    pub(crate) deflate_level: u8,
    pub(crate) snappy: bool,
    /// `None`: nsqd's output buffering disabled (sent as -1).
    pub(crate) output_buffer_size: Option<u64>,
    /// `None`: nsqd's output buffer timeout disabled (sent as -1).
    pub(crate) output_buffer_timeout: Option<Duration>,
    pub(crate) max_in_flight: u32,
    /// `None`: nsqd's default.
    pub(crate) msg_timeout: Option<Duration>,
    pub(crate) auth_secret: Option<String>,
    /// Send `auth_secret` as a Bearer token on lookupd queries.
    pub(crate) lookupd_authorization: bool,
    pub(crate) max_msg_size: u32,
    /// `None`: derived from `max_msg_size`.
    pub(crate) max_frame_size: Option<u32>,
    /// `None`: a fresh seed from the operating system's entropy for every state machine.
    pub(crate) rng_seed: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            dial_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(1),
            local_addr: None,
            lookupd_poll_interval: Duration::from_secs(60),
            lookupd_poll_jitter: 0.3,
            lookupd_poll_timeout: MIN,
            max_requeue_delay: Duration::from_secs(15 * 60),
            default_requeue_delay: Duration::from_secs(90),
            backoff_strategy: BackoffStrategy::Exponential,
            max_backoff_duration: Duration::from_secs(120),
            backoff_multiplier: Duration::from_secs(1),
            max_attempts: 5,
            low_rdy_idle_timeout: Duration::from_secs(10),
            low_rdy_timeout: Duration::from_secs(30),
            rdy_redistribute_interval: Duration::from_secs(5),
            client_id: String::new(),
            hostname: String::new(),
            user_agent: concat!("nsq-rs/", env!("CARGO_PKG_VERSION")).to_owned(),
            topology_region: String::new(),
            topology_zone: String::new(),
            heartbeat_interval: Some(Duration::from_secs(30)),
            sample_rate: 0,
            tls: TlsOptions::default(),
            deflate: false,
            deflate_level: 6,
            snappy: false,
            output_buffer_size: Some(16 * 1024),
            output_buffer_timeout: Some(Duration::from_millis(250)),
            max_in_flight: 1,
            msg_timeout: None,
            auth_secret: None,
            lookupd_authorization: true,
            max_msg_size: DEFAULT_MAX_MSG_SIZE as u32,
            max_frame_size: None,
            rng_seed: None,
        }
    }
}

/// What a message frame's size field counts beyond the body: the frame type (4 bytes), the
/// timestamp (8), the attempts (2) and the message id (16).
pub const MESSAGE_FRAME_OVERHEAD: u32 = 30;

/// The largest [`Config::max_msg_size`]: nsqd writes a frame's size as a signed 32-bit
/// integer, and a message frame adds [`MESSAGE_FRAME_OVERHEAD`] bytes to the body.
pub const MAX_MSG_SIZE_LIMIT: u32 = i32::MAX as u32 - MESSAGE_FRAME_OVERHEAD;

const MAX_FRAME_SIZE_RANGE: &str = "1024..=4294967295";
const MAX_MSG_SIZE_RANGE: &str = "1..=2147483617 (0, go-nsq's \"no limit\", is not supported)";

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
const MIN: Duration = Duration::from_secs(60);

macro_rules! duration_setter {
    ($(#[$doc:meta])* $name:ident, $lo:expr, $hi:expr, $range:literal) => {
        $(#[$doc])*
        pub fn $name(&mut self, value: Duration) -> Result<&mut Self, ConfigError> {
            self.$name = in_range(stringify!($name), value, $lo, $hi, $range)?;
            Ok(self)
        }
    };
}

impl Config {
    /// A configuration with go-nsq's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets an option by its go-nsq name (dashes may stand for underscores) from text.
    ///
    /// Durations take Go's syntax (`"250ms"`, `"1m30s"`, `"1.5h"`) or a bare integer of
    /// milliseconds, as go-nsq does; booleans take `true`/`false`/`1`/`0`.
    pub fn set(&mut self, option: &str, value: &str) -> Result<&mut Self, ConfigError> {
        let option = option.replace('-', "_");
        let v = value.trim();
        match option.as_str() {
            "dial_timeout" => self.dial_timeout = duration("dial_timeout", v)?,
            "read_timeout" => return self.read_timeout(duration("read_timeout", v)?),
            "write_timeout" => return self.write_timeout(duration("write_timeout", v)?),
            "local_addr" => {
                self.local_addr = if v.is_empty() { None } else { Some(parse("local_addr", v, "ip:port")?) }
            }
            "lookupd_poll_interval" => return self.lookupd_poll_interval(duration("lookupd_poll_interval", v)?),
            "lookupd_poll_jitter" => return self.lookupd_poll_jitter(parse("lookupd_poll_jitter", v, "a number")?),
            "lookupd_poll_timeout" => return self.lookupd_poll_timeout(duration("lookupd_poll_timeout", v)?),
            "max_requeue_delay" => return self.max_requeue_delay(duration("max_requeue_delay", v)?),
            "default_requeue_delay" => return self.default_requeue_delay(duration("default_requeue_delay", v)?),
            "backoff_strategy" => {
                self.backoff_strategy = match v {
                    "exponential" | "" => BackoffStrategy::Exponential,
                    "full_jitter" => BackoffStrategy::FullJitter,
                    _ => return Err(invalid("backoff_strategy", v, "exponential or full_jitter")),
                }
            }
            "max_backoff_duration" => return self.max_backoff_duration(duration("max_backoff_duration", v)?),
            "backoff_multiplier" => return self.backoff_multiplier(duration("backoff_multiplier", v)?),
            "max_attempts" => self.max_attempts = int("max_attempts", v, "0..=65535")?,
            "low_rdy_idle_timeout" => return self.low_rdy_idle_timeout(duration("low_rdy_idle_timeout", v)?),
            "low_rdy_timeout" => return self.low_rdy_timeout(duration("low_rdy_timeout", v)?),
            "rdy_redistribute_interval" => {
                return self.rdy_redistribute_interval(duration("rdy_redistribute_interval", v)?)
            }
            "client_id" => self.client_id = value.to_owned(),
            "hostname" => self.hostname = value.to_owned(),
            "user_agent" => self.user_agent = value.to_owned(),
            "topology_region" => self.topology_region = value.to_owned(),
            "topology_zone" => self.topology_zone = value.to_owned(),
            "heartbeat_interval" => {
                self.heartbeat_interval =
                    if v.starts_with('-') { None } else { Some(duration("heartbeat_interval", v)?) }
            }
            "sample_rate" => return self.sample_rate(int("sample_rate", v, "0..=99")?),
            "tls_v1" => return Ok(self.tls_v1(boolean("tls_v1", v)?)),
            "tls_config" => {
                return Err(invalid("tls_config", v, "a rustls ClientConfig, given with Config::tls_config"))
            }
            "tls_root_ca_file" => return Ok(self.tls_root_ca_file(value)),
            "tls_cert" => return Ok(self.tls_cert(value)),
            "tls_key" => return Ok(self.tls_key(value)),
            "tls_insecure_skip_verify" => {
                return Ok(self.tls_insecure_skip_verify(boolean("tls_insecure_skip_verify", v)?))
            }
            "tls_min_version" => {
                let version = match v {
                    "tls1.2" => TlsVersion::Tls12,
                    "tls1.3" => TlsVersion::Tls13,
                    "ssl3.0" | "tls1.0" | "tls1.1" => {
                        return Err(ConfigError::OutOfRange {
                            option: "tls_min_version",
                            value: v.to_owned(),
                            range: "tls1.2 or tls1.3 (older versions are insecure and unsupported)",
                        })
                    }
                    _ => return Err(invalid("tls_min_version", v, "tls1.2 or tls1.3")),
                };
                return Ok(self.tls_min_version(version));
            }
            "tls_server_name" => return Ok(self.tls_server_name(value)),
            "deflate" => self.deflate = boolean("deflate", v)?,
            "deflate_level" => return self.deflate_level(int("deflate_level", v, "1..=9")?),
            "snappy" => self.snappy = boolean("snappy", v)?,
            "output_buffer_size" => {
                let n: i64 = parse("output_buffer_size", v, "an integer (-1 disables)")?;
                self.output_buffer_size = u64::try_from(n).ok();
            }
            "output_buffer_timeout" => {
                self.output_buffer_timeout =
                    if v.starts_with('-') { None } else { Some(duration("output_buffer_timeout", v)?) }
            }
            "max_in_flight" => self.max_in_flight = int("max_in_flight", v, "0..=4294967295")?,
            "msg_timeout" => {
                let d = duration("msg_timeout", v)?;
                self.msg_timeout = (!d.is_zero()).then_some(d);
            }
            "auth_secret" => self.auth_secret = (!value.is_empty()).then(|| value.to_owned()),
            "skip_lookupd_authorization" => {
                return Ok(self.lookupd_authorization(boolean("skip_lookupd_authorization", v)?))
            }
            "max_msg_size" => return self.max_msg_size(int("max_msg_size", v, MAX_MSG_SIZE_RANGE)?),
            "max_frame_size" => {
                let limit = if v.is_empty() { None } else { Some(int("max_frame_size", v, MAX_FRAME_SIZE_RANGE)?) };
                return self.max_frame_size(limit);
            }
            "rng_seed" => {
                self.rng_seed = if v.is_empty() { None } else { Some(int("rng_seed", v, "0..=18446744073709551615")?) }
            }
            _ => return Err(ConfigError::UnknownOption(option)),
        }
        Ok(self)
    }

    /// Checks combinations, as go-nsq's `Validate` does: snappy and deflate exclude each
    /// other, the heartbeat interval must be below the read timeout, and a client certificate
    /// needs its key. Also, an explicit `max_frame_size` must hold a message of `max_msg_size`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.snappy && self.deflate {
            return Err(ConfigError::Conflict("snappy and deflate cannot both be enabled".into()));
        }
        if let Some(hb) = self.heartbeat_interval {
            if hb > self.read_timeout {
                return Err(ConfigError::Conflict(format!(
                    "heartbeat_interval {hb:?} must be less than read_timeout {:?}",
                    self.read_timeout
                )));
            }
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(ConfigError::Conflict("tls_cert and tls_key must be set together".into()));
        }
        if let Some(limit) = self.max_frame_size {
            let needed = self.max_msg_size.saturating_add(MESSAGE_FRAME_OVERHEAD);
            if limit < needed {
                return Err(ConfigError::Conflict(format!(
                    "max_frame_size {limit} cannot hold a message of max_msg_size {} bytes: it needs at least {needed}",
                    self.max_msg_size
                )));
            }
        }
        Ok(())
    }

    /// Time to establish a TCP connection (`dial_timeout`, default 1s).
    pub fn dial_timeout(&mut self, value: Duration) -> &mut Self {
        self.dial_timeout = value;
        self
    }

    duration_setter!(
        /// Deadline for reads: no data (not even a heartbeat) for this long ends the connection
        /// (`read_timeout`, default 60s, 100ms..=5m).
        read_timeout, 100 * MS, 5 * MIN, "100ms..=5m"
    );
    duration_setter!(
        /// Deadline for each write (`write_timeout`, default 1s, 100ms..=5m). Also the longest
        /// a producer's commands wait behind unanswered writes
        /// ([`MAX_UNANSWERED_WRITES`](crate::MAX_UNANSWERED_WRITES)).
        write_timeout, 100 * MS, 5 * MIN, "100ms..=5m"
    );

    /// Local address to dial nsqd from (`local_addr`, default: chosen by the OS).
    ///
    /// Every nsqd connection's socket is bound to it before connecting ([`Action::Connect`]
    /// carries it; the runtime crates bind on every runtime). Port 0 lets the OS pick the port,
    /// which is what several connections from one address need. As in go-nsq, lookupd queries
    /// are not bound to it.
    ///
    /// [`Action::Connect`]: crate::Action::Connect
    pub fn local_addr(&mut self, value: Option<SocketAddr>) -> &mut Self {
        self.local_addr = value;
        self
    }

    duration_setter!(
        /// Time between lookupd polls (`lookupd_poll_interval`, default 60s, 10ms..=5m).
        lookupd_poll_interval, 10 * MS, 5 * MIN, "10ms..=5m"
    );

    /// Fraction of the poll interval added at random to the first poll, so consumers started
    /// together spread their queries (`lookupd_poll_jitter`, default 0.3, 0..=1).
    pub fn lookupd_poll_jitter(&mut self, value: f64) -> Result<&mut Self, ConfigError> {
        if !(0.0..=1.0).contains(&value) {
            return Err(ConfigError::OutOfRange {
                option: "lookupd_poll_jitter",
                value: value.to_string(),
                range: "0..=1",
            });
        }
        self.lookupd_poll_jitter = value;
        Ok(self)
    }

    /// Deadline of one lookupd query: connecting, sending the request and reading the whole
    /// answer (`lookupd_poll_timeout`, default 1m, at least 1ms).
    ///
    /// go-nsq takes 0 as "no deadline"; here 0 is refused, because a lookupd that accepts the
    /// connection and never answers would then stall discovery for good.
    pub fn lookupd_poll_timeout(&mut self, value: Duration) -> Result<&mut Self, ConfigError> {
        self.lookupd_poll_timeout = in_range("lookupd_poll_timeout", value, MS, Duration::MAX, "at least 1ms")?;
        Ok(self)
    }

    duration_setter!(
        /// Cap of the default requeue delay (`max_requeue_delay`, default 15m, 0..=60m).
        max_requeue_delay, Duration::ZERO, 60 * MIN, "0..=60m"
    );
    duration_setter!(
        /// Requeue delay per attempt when none is given (`default_requeue_delay`, default 90s,
        /// 0..=60m).
        default_requeue_delay, Duration::ZERO, 60 * MIN, "0..=60m"
    );

    /// Backoff strategy (`backoff_strategy`: `exponential` (default) or `full_jitter`).
    pub fn backoff_strategy(&mut self, value: BackoffStrategy) -> &mut Self {
        self.backoff_strategy = value;
        self
    }

    duration_setter!(
        /// Longest backoff; 0 disables backoff (`max_backoff_duration`, default 2m, 0..=60m).
        max_backoff_duration, Duration::ZERO, 60 * MIN, "0..=60m"
    );
    duration_setter!(
        /// Unit of backoff (`backoff_multiplier`, default 1s, 0..=60m).
        backoff_multiplier, Duration::ZERO, 60 * MIN, "0..=60m"
    );

    /// Deliveries after which a message is given up; 0 never gives up (`max_attempts`,
    /// default 5, 0..=65535).
    pub fn max_attempts(&mut self, value: u16) -> &mut Self {
        self.max_attempts = value;
        self
    }

    duration_setter!(
        /// Idle time after which a connection gives up its RDY when RDY is redistributed
        /// (`low_rdy_idle_timeout`, default 10s, 1s..=5m).
        low_rdy_idle_timeout, SEC, 5 * MIN, "1s..=5m"
    );
    duration_setter!(
        /// Time after which a connection's RDY is given up when RDY is redistributed
        /// (`low_rdy_timeout`, default 30s, 1s..=5m).
        low_rdy_timeout, SEC, 5 * MIN, "1s..=5m"
    );
    duration_setter!(
        /// Time between RDY redistributions (`rdy_redistribute_interval`, default 5s, 1ms..=5s).
        rdy_redistribute_interval, MS, 5 * SEC, "1ms..=5s"
    );

    /// Client id sent in IDENTIFY (`client_id`).
    pub fn client_id(&mut self, value: impl Into<String>) -> &mut Self {
        self.client_id = value.into();
        self
    }

    /// Host name sent in IDENTIFY (`hostname`).
    pub fn hostname(&mut self, value: impl Into<String>) -> &mut Self {
        self.hostname = value.into();
        self
    }

    /// User agent sent in IDENTIFY (`user_agent`, default `nsq-rs/<version>` where go-nsq
    /// sends `go-nsq/<version>`).
    pub fn user_agent(&mut self, value: impl Into<String>) -> &mut Self {
        self.user_agent = value.into();
        self
    }

    /// Region sent in IDENTIFY (`topology_region`, default empty: not sent). An nsqd started
    /// with `--topology-region` and the `topology-aware-consumption` experiment prefers to
    /// deliver to consumers of its own region.
    pub fn topology_region(&mut self, value: impl Into<String>) -> &mut Self {
        self.topology_region = value.into();
        self
    }

    /// Zone sent in IDENTIFY (`topology_zone`, default empty: not sent). An nsqd started with
    /// `--topology-zone` and the `topology-aware-consumption` experiment prefers to deliver to
    /// consumers of its own zone, then of its own region.
    pub fn topology_zone(&mut self, value: impl Into<String>) -> &mut Self {
        self.topology_zone = value.into();
        self
    }

    /// Heartbeat interval asked of nsqd; `None` disables heartbeats (`heartbeat_interval`,
    /// default 30s; nsqd accepts 1s..=60s).
    pub fn heartbeat_interval(&mut self, value: Option<Duration>) -> &mut Self {
        self.heartbeat_interval = value;
        self
    }

    /// Percentage of the channel's messages to receive; 0 receives all (`sample_rate`,
    /// default 0, 0..=99).
    pub fn sample_rate(&mut self, value: u8) -> Result<&mut Self, ConfigError> {
        if value > 99 {
            return Err(ConfigError::OutOfRange { option: "sample_rate", value: value.to_string(), range: "0..=99" });
        }
        self.sample_rate = value;
        Ok(self)
    }

    /// All TLS settings at once (`tls_v1`, `tls_config`, `tls_root_ca_file`, `tls_cert`,
    /// `tls_key`, `tls_insecure_skip_verify`, `tls_min_version`, `tls_server_name`).
    ///
    /// Besides nsqd connections (when `tls_v1` is on), they also verify `https://` lookupds,
    /// whatever `tls_v1` says; `tls_server_name` is for nsqd only (a lookupd's certificate
    /// must carry the lookupd's host).
    pub fn tls(&mut self, value: TlsOptions) -> &mut Self {
        self.tls = value;
        self
    }

    /// Asks nsqd for TLS (`tls_v1`, default off). A connection whose nsqd does not agree fails
    /// rather than going on in clear.
    ///
    /// Without `tls_root_ca_file`, nsqd's certificate is verified against the system's trust
    /// store, as go-nsq does (falling back to the bundled webpki roots when the system store
    /// holds no usable certificate).
    pub fn tls_v1(&mut self, value: bool) -> &mut Self {
        self.tls.enabled = value;
        self
    }

    /// A ready rustls client configuration, used as is: the file options are then ignored
    /// (`tls_config`, go-nsq's `*tls.Config`). Not settable from text, in go-nsq either.
    ///
    /// Unlike go-nsq, this also switches TLS on.
    pub fn tls_config(&mut self, value: Arc<rustls::ClientConfig>) -> &mut Self {
        self.tls.client_config = Some(value);
        self.tls.enabled = true;
        self
    }

    /// PEM file of the CA certificates that verify nsqd (`tls_root_ca_file`) and `https://`
    /// lookupds. As in go-nsq, they replace the system's trust store rather than add to it.
    ///
    /// Unlike go-nsq, this also switches TLS on (`tls_v1`); to verify an `https://` lookupd
    /// with it while nsqd stays plain, call `tls_v1(false)` after it.
    pub fn tls_root_ca_file(&mut self, value: impl Into<PathBuf>) -> &mut Self {
        self.tls.root_ca_file = Some(value.into());
        self.tls.enabled = true;
        self
    }

    /// PEM client certificate chain, sent when nsqd asks for one (`tls_cert`; needs `tls_key`).
    ///
    /// Unlike go-nsq, this also switches TLS on (`tls_v1`).
    pub fn tls_cert(&mut self, value: impl Into<PathBuf>) -> &mut Self {
        self.tls.cert_file = Some(value.into());
        self.tls.enabled = true;
        self
    }

    /// PEM private key of the client certificate (`tls_key`; needs `tls_cert`).
    ///
    /// Unlike go-nsq, this also switches TLS on (`tls_v1`).
    pub fn tls_key(&mut self, value: impl Into<PathBuf>) -> &mut Self {
        self.tls.key_file = Some(value.into());
        self.tls.enabled = true;
        self
    }

    /// Accepts any server certificate (`tls_insecure_skip_verify`, default off). Dangerous:
    /// anyone on the path can then read and forge the traffic.
    pub fn tls_insecure_skip_verify(&mut self, value: bool) -> &mut Self {
        self.tls.danger_accept_invalid_certs = value;
        self
    }

    /// The lowest TLS version to accept (`tls_min_version`: `tls1.2` (default) or `tls1.3`).
    ///
    /// go-nsq also takes `ssl3.0`, `tls1.0` and `tls1.1` and defaults to `tls1.0`; rustls
    /// speaks nothing below TLS 1.2, so these are refused.
    pub fn tls_min_version(&mut self, value: TlsVersion) -> &mut Self {
        self.tls.min_version = value;
        self
    }

    /// The name nsqd's certificate must carry (`tls_server_name`, not a go-nsq option, which
    /// has it inside `tls_config`; default: the host dialled).
    pub fn tls_server_name(&mut self, value: impl Into<String>) -> &mut Self {
        self.tls.server_name = Some(value.into());
        self
    }

    /// Asks for deflate compression (`deflate`, default off).
    pub fn deflate(&mut self, value: bool) -> &mut Self {
        self.deflate = value;
        self
    }

    /// Deflate level (`deflate_level`, default 6, 1..=9).
    pub fn deflate_level(&mut self, value: u8) -> Result<&mut Self, ConfigError> {
        if !(1..=9).contains(&value) {
            return Err(ConfigError::OutOfRange { option: "deflate_level", value: value.to_string(), range: "1..=9" });
        }
        self.deflate_level = value;
        Ok(self)
    }

    /// Asks for snappy compression (`snappy`, default off).
    pub fn snappy(&mut self, value: bool) -> &mut Self {
        self.snappy = value;
        self
    }

    /// nsqd's output buffer for this connection; `None` disables buffering
    /// (`output_buffer_size`, default 16384).
    pub fn output_buffer_size(&mut self, value: Option<u64>) -> &mut Self {
        self.output_buffer_size = value;
        self
    }

    /// nsqd's flush timeout for this connection; `None` disables it
    /// (`output_buffer_timeout`, default 250ms).
    pub fn output_buffer_timeout(&mut self, value: Option<Duration>) -> &mut Self {
        self.output_buffer_timeout = value;
        self
    }

    /// Messages in flight across a consumer's connections (`max_in_flight`, default 1).
    pub fn max_in_flight(&mut self, value: u32) -> &mut Self {
        self.max_in_flight = value;
        self
    }

    /// Message timeout asked of nsqd; `None` uses nsqd's (`msg_timeout`).
    pub fn msg_timeout(&mut self, value: Option<Duration>) -> &mut Self {
        self.msg_timeout = value;
        self
    }

    /// Secret sent with AUTH when nsqd requires it (`auth_secret`).
    pub fn auth_secret(&mut self, value: impl Into<String>) -> &mut Self {
        self.auth_secret = Some(value.into());
        self
    }

    /// Whether lookupd queries carry `Authorization: Bearer <auth_secret>` when an
    /// `auth_secret` is set (default true).
    ///
    /// By name this is go-nsq's `skip_lookupd_authorization`, which, despite its name, holds
    /// go-nsq's `LookupdAuthorization` field: `true` (its default) sends the header and
    /// `false` leaves it out. [`Config::set`] keeps go-nsq's sense, so a go-nsq configuration
    /// means the same here.
    pub fn lookupd_authorization(&mut self, value: bool) -> &mut Self {
        self.lookupd_authorization = value;
        self
    }

    /// The largest message body, in bytes (`max_msg_size`, default 1 MiB, 1..=2147483617).
    ///
    /// It bounds both directions: a publish with a larger body is refused with
    /// [`CommandError::BodyTooLarge`] before anything is sent, and a frame from nsqd larger
    /// than a message of this size (plus [`MESSAGE_FRAME_OVERHEAD`] bytes of frame and message
    /// header) ends the connection before anything is buffered for it, unless
    /// [`max_frame_size`](Self::max_frame_size) says otherwise. Set it to nsqd's
    /// `--max-msg-size`.
    ///
    /// go-nsq's default is 0, no limit on what it reads (and it checks nothing it publishes);
    /// here the default is nsqd's own default, 1 MiB, and 0 is refused, because an unbounded
    /// read lets one frame header make the client allocate up to 2 GiB.
    pub fn max_msg_size(&mut self, value: u32) -> Result<&mut Self, ConfigError> {
        if !(1..=MAX_MSG_SIZE_LIMIT).contains(&value) {
            return Err(ConfigError::OutOfRange {
                option: "max_msg_size",
                value: value.to_string(),
                range: MAX_MSG_SIZE_RANGE,
            });
        }
        self.max_msg_size = value;
        Ok(self)
    }

    /// The largest frame read from nsqd, as its size field counts it (`max_frame_size`, not a
    /// go-nsq option; at least 1 KiB; from text, an empty value means `None`).
    ///
    /// `None` (the default) derives it from [`max_msg_size`](Self::max_msg_size): a message of
    /// `max_msg_size` bytes plus [`MESSAGE_FRAME_OVERHEAD`], 1 MiB + 30 bytes by default. Set it
    /// to read larger frames than `max_msg_size` lets this client publish;
    /// [`validate`](Self::validate) refuses a value too small for a message of
    /// `max_msg_size`.
    pub fn max_frame_size(&mut self, value: Option<u32>) -> Result<&mut Self, ConfigError> {
        if let Some(limit) = value.filter(|&limit| limit < 1024) {
            return Err(ConfigError::OutOfRange {
                option: "max_frame_size",
                value: limit.to_string(),
                range: MAX_FRAME_SIZE_RANGE,
            });
        }
        self.max_frame_size = value;
        Ok(self)
    }

    /// Fixes the seed of the generator behind every random choice of a producer or consumer
    /// (backoff and redial jitter, lookupd poll jitter, RDY rotation), so a run can be
    /// reproduced, e.g. in tests (`rng_seed`, not a go-nsq option).
    ///
    /// By default (unset, or set to the empty string by name) each state machine seeds its
    /// generator from the operating system's entropy, so processes started together draw
    /// different jitter and spread their retries instead of repeating them in step.
    pub fn rng_seed(&mut self, value: u64) -> &mut Self {
        self.rng_seed = Some(value);
        self
    }
}

impl Config {
    /// The largest frame size field a connection accepts.
    pub(crate) fn frame_limit(&self) -> u32 {
        self.max_frame_size.unwrap_or_else(|| self.max_msg_size.saturating_add(MESSAGE_FRAME_OVERHEAD))
    }

    /// Checks a body about to be published: not empty, at most `max_msg_size` bytes.
    pub(crate) fn check_body(&self, body: &Bytes) -> Result<(), CommandError> {
        if body.is_empty() {
            return Err(CommandError::EmptyBody);
        }
        let max = self.max_msg_size as usize;
        if body.len() > max {
            return Err(CommandError::BodyTooLarge { size: body.len(), max });
        }
        Ok(())
    }

    /// Checks the bodies of an MPUB: at least one, each as [`check_body`](Self::check_body).
    pub(crate) fn check_batch(&self, bodies: &[Bytes]) -> Result<(), CommandError> {
        if bodies.is_empty() {
            return Err(CommandError::EmptyBatch);
        }
        bodies.iter().try_for_each(|body| self.check_body(body))
    }

    /// Checks a DPUB: its body, and a delay nsqd accepts (at most its default `--max-req-timeout`).
    pub(crate) fn check_deferred(&self, delay: std::time::Duration, body: &Bytes) -> Result<(), CommandError> {
        self.check_body(body)?;
        let max = crate::connection::DEFAULT_MAX_DEFER;
        if delay > max {
            return Err(CommandError::DelayOutOfRange { delay_ms: delay.as_millis(), max_ms: max.as_millis() });
        }
        Ok(())
    }
}

fn invalid(option: &'static str, value: &str, expected: &'static str) -> ConfigError {
    ConfigError::InvalidValue { option, value: value.to_owned(), expected }
}

fn parse<T: std::str::FromStr>(option: &'static str, value: &str, expected: &'static str) -> Result<T, ConfigError> {
    value.parse().map_err(|_| invalid(option, value, expected))
}

/// An integer option: a value that parses as an integer but not as `T` is out of range.
fn int<T: std::str::FromStr>(option: &'static str, value: &str, range: &'static str) -> Result<T, ConfigError> {
    value.parse().map_err(|_| {
        if value.parse::<i128>().is_ok() {
            ConfigError::OutOfRange { option, value: value.to_owned(), range }
        } else {
            invalid(option, value, "an integer")
        }
    })
}

fn boolean(option: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(invalid(option, value, "true or false")),
    }
}

fn in_range(
    option: &'static str,
    value: Duration,
    lo: Duration,
    hi: Duration,
    range: &'static str,
) -> Result<Duration, ConfigError> {
    if value < lo || value > hi {
        return Err(ConfigError::OutOfRange { option, value: format!("{value:?}"), range });
    }
    Ok(value)
}

/// A Go duration (`"1h2m3.5s"`, `"250ms"`, `"10us"`) or a bare integer of milliseconds.
fn duration(option: &'static str, value: &str) -> Result<Duration, ConfigError> {
    const EXPECTED: &str = "a duration such as 250ms, 1m30s or a number of milliseconds";
    let err = || invalid(option, value, EXPECTED);
    if let Ok(ms) = value.parse::<u64>() {
        return Ok(Duration::from_millis(ms));
    }
    let mut rest = value.strip_prefix('+').unwrap_or(value);
    if rest.is_empty() || rest.starts_with('-') {
        return Err(err());
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(err)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| err())?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    Duration::try_from_secs_f64(total).map_err(|_| err())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_go_nsq() {
        let c = Config::new();
        assert_eq!(c.dial_timeout, SEC);
        assert_eq!(c.read_timeout, 60 * SEC);
        assert_eq!(c.write_timeout, SEC);
        assert_eq!(c.lookupd_poll_interval, 60 * SEC);
        assert_eq!(c.lookupd_poll_jitter, 0.3);
        assert_eq!(c.lookupd_poll_timeout, MIN);
        assert_eq!(c.max_requeue_delay, 15 * MIN);
        assert_eq!(c.default_requeue_delay, 90 * SEC);
        assert_eq!(c.backoff_strategy, BackoffStrategy::Exponential);
        assert_eq!(c.max_backoff_duration, 2 * MIN);
        assert_eq!(c.backoff_multiplier, SEC);
        assert_eq!(c.max_attempts, 5);
        assert_eq!(c.low_rdy_idle_timeout, 10 * SEC);
        assert_eq!(c.low_rdy_timeout, 30 * SEC);
        assert_eq!(c.rdy_redistribute_interval, 5 * SEC);
        assert_eq!(c.heartbeat_interval, Some(30 * SEC));
        assert_eq!(c.sample_rate, 0);
        assert_eq!(c.deflate_level, 6);
        assert!(!c.deflate && !c.snappy && !c.tls.enabled);
        assert_eq!(c.output_buffer_size, Some(16384));
        assert_eq!(c.output_buffer_timeout, Some(250 * MS));
        assert_eq!(c.max_in_flight, 1);
        assert_eq!(c.msg_timeout, None);
        assert!(c.topology_region.is_empty() && c.topology_zone.is_empty());
        assert!(c.lookupd_authorization);
        c.validate().unwrap();
    }

    #[test]
    fn deliberate_differences_from_go_nsq() {
        let c = Config::new();
        // go-nsq: 0, no limit on reads; here nsqd's own default, for both directions.
        assert_eq!(c.max_msg_size, 1024 * 1024);
        assert_eq!(c.max_frame_size, None);
        assert_eq!(c.frame_limit(), 1024 * 1024 + 30);
        assert_eq!(c.tls.min_version, TlsVersion::Tls12);
        assert!(c.user_agent.starts_with("nsq-rs/"));
    }

    #[test]
    fn range_boundaries() {
        let rows: &[(&str, &str, &str, &str, &str)] = &[
            // option, lowest ok, just below, highest ok, just above
            ("read_timeout", "100ms", "99ms", "5m", "5m1ms"),
            ("write_timeout", "100ms", "99ms", "5m", "300001"),
            ("lookupd_poll_interval", "10ms", "9ms", "5m", "5m1s"),
            ("lookupd_poll_jitter", "0", "-0.1", "1", "1.01"),
            ("max_requeue_delay", "0", "-1s", "60m", "61m"),
            ("default_requeue_delay", "0", "-1ms", "1h", "1h1s"),
            ("max_backoff_duration", "0s", "-1s", "60m", "60m1s"),
            ("backoff_multiplier", "0", "-1s", "60m", "2h"),
            ("max_attempts", "0", "-1", "65535", "65536"),
            ("low_rdy_idle_timeout", "1s", "999ms", "5m", "6m"),
            ("low_rdy_timeout", "1s", "999ms", "5m", "6m"),
            ("rdy_redistribute_interval", "1ms", "0", "5s", "5001"),
            ("sample_rate", "0", "-1", "99", "100"),
            ("deflate_level", "1", "0", "9", "10"),
            ("lookupd_poll_timeout", "1ms", "0", "100h", "-1s"),
            ("max_msg_size", "1", "0", "2147483617", "2147483618"),
            ("max_frame_size", "1024", "1023", "4294967295", "4294967296"),
        ];
        for &(option, lo, below, hi, above) in rows {
            let mut c = Config::new();
            c.set(option, lo).unwrap_or_else(|e| panic!("{option}={lo}: {e}"));
            c.set(option, hi).unwrap_or_else(|e| panic!("{option}={hi}: {e}"));
            for bad in [below, above] {
                let err = c.set(option, bad).unwrap_err();
                assert!(
                    matches!(&err, ConfigError::OutOfRange { option: o, .. } | ConfigError::InvalidValue { option: o, .. } if *o == option),
                    "{option}={bad}: {err:?}"
                );
                assert!(err.to_string().contains(option), "{err}");
            }
        }
        let err = Config::new().set("read_timeout", "10m").unwrap_err();
        assert_eq!(err.to_string(), "read_timeout = 600s is out of range 100ms..=5m");
    }

    #[test]
    fn parses_names_and_values_like_go_nsq() {
        let mut c = Config::new();
        c.set("max-in-flight", "200").unwrap();
        assert_eq!(c.max_in_flight, 200);
        c.set("heartbeat_interval", "1m30s").unwrap();
        assert_eq!(c.heartbeat_interval, Some(90 * SEC));
        c.set("heartbeat_interval", "-1").unwrap();
        assert_eq!(c.heartbeat_interval, None);
        c.set("msg_timeout", "1.5s").unwrap();
        assert_eq!(c.msg_timeout, Some(1500 * MS));
        c.set("dial_timeout", "2500").unwrap();
        assert_eq!(c.dial_timeout, 2500 * MS);
        c.set("snappy", "true").unwrap().set("deflate", "0").unwrap();
        assert!(c.snappy && !c.deflate);
        c.set("backoff_strategy", "full_jitter").unwrap();
        assert_eq!(c.backoff_strategy, BackoffStrategy::FullJitter);
        c.set("tls_root_ca_file", "/ca.pem").unwrap();
        assert!(c.tls.enabled);
        c.set("tls_min_version", "tls1.3").unwrap();
        assert!(matches!(c.set("tls_min_version", "tls1.0"), Err(ConfigError::OutOfRange { .. })));
        c.set("auth_secret", "xyz").unwrap();
        assert_eq!(c.auth_secret.as_deref(), Some("xyz"));
        c.set("skip_lookupd_authorization", "false").unwrap();
        assert!(!c.lookupd_authorization, "go-nsq's sense: false leaves the header out");
        c.set("topology_region", "eu-west").unwrap().set("topology-zone", "eu-west-1a").unwrap();
        assert_eq!((&*c.topology_region, &*c.topology_zone), ("eu-west", "eu-west-1a"));
        c.set("lookupd_poll_timeout", "15s").unwrap();
        assert_eq!(c.lookupd_poll_timeout, 15 * SEC);
        assert!(matches!(c.set("tls_config", "x"), Err(ConfigError::InvalidValue { option: "tls_config", .. })));
        assert_eq!(c.set("nope", "1").unwrap_err(), ConfigError::UnknownOption("nope".into()));
        assert!(matches!(c.set("snappy", "yes"), Err(ConfigError::InvalidValue { option: "snappy", .. })));
        assert!(matches!(c.set("read_timeout", "5 parsecs"), Err(ConfigError::InvalidValue { .. })));
        for bad in ["", "1x", "ms", "1.2.3s", "-5s"] {
            assert!(duration("d", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn combinations_are_checked() {
        let mut c = Config::new();
        c.set("snappy", "true").unwrap().set("deflate", "true").unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Conflict(_))));
        let mut c = Config::new();
        c.set("heartbeat_interval", "2m").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("heartbeat_interval"));
        let mut c = Config::new();
        c.set("tls_cert", "/c.pem").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_read_limit_follows_max_msg_size_unless_set() {
        let mut c = Config::new();
        c.set("max_msg_size", "4096").unwrap();
        assert_eq!(c.frame_limit(), 4096 + MESSAGE_FRAME_OVERHEAD);
        c.set("max_frame_size", "65536").unwrap();
        assert_eq!(c.frame_limit(), 65536);
        c.validate().unwrap();
        // An explicit limit too small for a message of max_msg_size is a conflict.
        c.set("max_frame_size", "4125").unwrap();
        let err = c.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid combination: max_frame_size 4125 cannot hold a message of max_msg_size 4096 bytes: it needs at least 4126"
        );
        c.set("max_frame_size", "4126").unwrap();
        c.validate().unwrap();
        // Empty goes back to the derived limit.
        c.set("max_frame_size", "").unwrap();
        assert_eq!(c.frame_limit(), 4126);
        // The largest max_msg_size still fits the protocol's signed 32-bit frame size.
        c.set("max_msg_size", &MAX_MSG_SIZE_LIMIT.to_string()).unwrap();
        assert_eq!(c.frame_limit(), i32::MAX as u32);
    }

    #[test]
    fn bodies_are_checked_against_max_msg_size() {
        let mut c = Config::new();
        c.max_msg_size(3).unwrap();
        assert_eq!(c.check_body(&Bytes::from_static(b"abc")), Ok(()));
        assert_eq!(c.check_body(&Bytes::from_static(b"abcd")), Err(CommandError::BodyTooLarge { size: 4, max: 3 }));
        assert_eq!(c.check_body(&Bytes::new()), Err(CommandError::EmptyBody));
    }
}
