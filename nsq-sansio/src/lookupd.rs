//! The nsqlookupd HTTP API: `GET /lookup?topic=...` request bytes and response parsing.

use bytes::Bytes;

use crate::Topic;

/// A lookupd address that cannot be used or a response that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LookupdError {
    /// The address is not `host:port` or `http://host:port`.
    #[error("bad lookupd address {0:?}")]
    Address(String),
    /// The response is not a lookupd answer.
    #[error("bad lookupd response: {0}")]
    Response(String),
}

pub(crate) fn normalize_addr(addr: &str) -> Result<String, LookupdError> {
    let a = addr
        .strip_prefix("http://")
        .unwrap_or(addr)
        .trim_end_matches('/');
    if a.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    {
        Ok(a.to_owned())
    } else {
        Err(LookupdError::Address(addr.to_owned()))
    }
}

pub(crate) fn request(addr: &str, topic: &Topic) -> Result<(String, Bytes), LookupdError> {
    let req = format!(
        "GET /lookup?topic={topic} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/vnd.nsq; version=1.0\r\nConnection: close\r\n\r\n"
    );
    Ok((addr.to_owned(), Bytes::from(req)))
}

pub(crate) fn parse(response: &[u8]) -> Result<Vec<String>, LookupdError> {
    let text = String::from_utf8_lossy(response);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| LookupdError::Response("no body".into()))?;
    if text.starts_with("HTTP/1.1 404") {
        return Ok(Vec::new());
    }
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| LookupdError::Response(e.to_string()))?;
    let producers = v
        .get("producers")
        .or_else(|| v.get("data").and_then(|d| d.get("producers")));
    Ok(producers
        .and_then(|p| p.as_array())
        .map(|ps| {
            ps.iter()
                .filter_map(|p| {
                    Some(format!(
                        "{}:{}",
                        p.get("broadcast_address")?.as_str()?,
                        p.get("tcp_port")?.as_u64()?
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}
