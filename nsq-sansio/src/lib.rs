//! A sans-IO NSQ client core.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod action;
mod config;
mod connection;
mod consumer;
mod error;
mod lookupd;
mod producer;
mod protocol;
mod timer;
mod transport;

pub use action::{Action, ConnId, QueryId};
pub use config::Config;
pub use connection::{
    AuthResponse, ConnectionState, ConnectionStats, Event, Phase, PublishId, DEFAULT_MAX_DEFER,
    DEFAULT_MAX_MSG_SIZE, DEFAULT_MAX_RDY_COUNT,
};
pub use consumer::{ConsumerError, ConsumerEvent, ConsumerState, ConsumerStats, Response};
pub use error::{CommandError, ConnectionError, PublishError};
pub use producer::{ProducerEvent, ProducerState, TxId};
pub use protocol::command::Command;
pub use protocol::frame::{
    decode, ErrorCode, Frame, FrameError, ServerError, CLOSE_WAIT, FRAME_HEADER_LEN,
    FRAME_TYPE_ERROR, FRAME_TYPE_MESSAGE, FRAME_TYPE_RESPONSE, HEARTBEAT, OK,
};
pub use protocol::identify::IdentifyResponse;
pub use protocol::message::Message;
pub use protocol::{Channel, MessageId, NameError, Topic, MAGIC_V2, MAX_NAME_LEN};
pub use transport::{TlsOptions, TlsVersion, TransportError};
