//! The client's startup options, as logical decoding plugin options.
//!
//! Options are (name, text value) pairs, as given in
//! `START_REPLICATION SLOT s LOGICAL lsn (name 'value', ...)` or to
//! `pg_logical_slot_peek_binary_changes(slot, NULL, NULL, 'name', 'value',
//! ...)`. Unknown, repeated and malformed options are refused, each error
//! naming the option, so that a misspelt or misunderstood option fails the
//! connection instead of being ignored.

use thiserror::Error;

use super::{DatumFormats, VersionRange, negotiate_version, pg_major};
use crate::{NodeId, PROTOCOL_VERSIONS, STARTUP_VERSION};

const STARTUP_VERSION_OPT: &str = "startup_version";
const MIN_PROTO_VERSION: &str = "min_proto_version";
const MAX_PROTO_VERSION: &str = "max_proto_version";
const NODE_ID: &str = "node_id";
const NODE_NAME: &str = "node_name";
const PG_VERSION_NUM: &str = "pg_version_num";
const DATUM_FORMATS: &str = "datum_formats";
const FORWARD_ORIGINS: &str = "forward_origins";
const STREAMING: &str = "streaming";

/// Every option name, in the order [`StartupOptions::to_pairs`] emits them.
pub const OPTION_NAMES: [&str; 9] = [
    STARTUP_VERSION_OPT,
    MIN_PROTO_VERSION,
    MAX_PROTO_VERSION,
    NODE_ID,
    NODE_NAME,
    PG_VERSION_NUM,
    DATUM_FORMATS,
    FORWARD_ORIGINS,
    STREAMING,
];

/// Why a client's options were refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StartupError {
    #[error("unknown startup option \"{name}\"")]
    UnknownOption { name: String },

    #[error("startup option \"{name}\" given more than once")]
    DuplicateOption { name: String },

    #[error("required startup option \"{name}\" is missing")]
    MissingOption { name: &'static str },

    #[error("startup option \"{name}\" has invalid value \"{value}\": expected {expected}")]
    MalformedOption {
        name: &'static str,
        value: String,
        expected: &'static str,
    },

    #[error("client uses startup version {client} but server supports {server}")]
    UnsupportedStartupVersion { client: u32, server: VersionRange },

    #[error(
        "startup option \"streaming\" needs protocol version 2, but version {chosen} was chosen"
    )]
    StreamingNeedsVersion2 { chosen: u32 },

    #[error("client supports protocol versions {client} but server supports {server}")]
    VersionMismatch {
        client: VersionRange,
        server: VersionRange,
    },
}

/// What the client asks for when it starts streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupOptions {
    /// `startup_version`: the version of these options and of the STARTUP
    /// reply the client expects. Required.
    pub startup_version: u32,
    /// `min_proto_version`, `max_proto_version`: the stream protocol
    /// versions the client can read. Required.
    pub proto_versions: VersionRange,
    /// `node_id`: the client node's identity. Required.
    pub node_id: NodeId,
    /// `node_name`: the client node's name (non-empty). Required.
    pub node_name: String,
    /// `pg_version_num`: the client's PostgreSQL `server_version_num`;
    /// binary datums are used only between equal major versions. Required.
    pub pg_version_num: u32,
    /// `datum_formats`: comma-separated formats the client accepts, among
    /// `text` (mandatory) and `binary`. Default `text`.
    pub datum_formats: DatumFormats,
    /// `forward_origins`: `true` to also receive changes that other nodes
    /// made and this node applied; `false` (default) for only the changes
    /// made on this node.
    pub forward_origins: bool,
    /// `streaming`: `true` to receive large transactions in blocks while
    /// they are in progress (STREAM START ... STREAM COMMIT, protocol
    /// version 2) instead of whole after their commit; `false` (default).
    pub streaming: bool,
}

/// The outcome of a successful negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The stream protocol version to use.
    pub proto_version: u32,
    /// The datum formats the stream will use.
    pub datum_formats: DatumFormats,
}

impl StartupOptions {
    /// Options for this crate's versions, accepting text and binary, not
    /// forwarding other origins' changes.
    pub fn new(node_id: NodeId, node_name: impl Into<String>, pg_version_num: u32) -> Self {
        StartupOptions {
            startup_version: STARTUP_VERSION,
            proto_versions: PROTOCOL_VERSIONS,
            node_id,
            node_name: node_name.into(),
            pg_version_num,
            datum_formats: DatumFormats::TEXT.union(DatumFormats::BINARY),
            forward_origins: false,
            streaming: false,
        }
    }

    /// The options as (name, value) pairs, for the replication command.
    pub fn to_pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            (STARTUP_VERSION_OPT, self.startup_version.to_string()),
            (MIN_PROTO_VERSION, self.proto_versions.min.to_string()),
            (MAX_PROTO_VERSION, self.proto_versions.max.to_string()),
            (NODE_ID, self.node_id.to_string()),
            (NODE_NAME, self.node_name.clone()),
            (PG_VERSION_NUM, self.pg_version_num.to_string()),
            (DATUM_FORMATS, self.datum_formats.to_string()),
            (FORWARD_ORIGINS, self.forward_origins.to_string()),
            (STREAMING, self.streaming.to_string()),
        ]
    }

    /// Parses (name, value) pairs, refusing unknown, repeated, missing and
    /// malformed options. A `startup_version` this crate does not speak is
    /// reported before anything else, since it may change the other options.
    pub fn from_pairs<N: AsRef<str>, V: AsRef<str>>(
        pairs: &[(N, V)],
    ) -> Result<Self, StartupError> {
        let mut values: [Option<&str>; OPTION_NAMES.len()] = [None; OPTION_NAMES.len()];
        for (name, value) in pairs {
            let name = name.as_ref();
            let index = OPTION_NAMES
                .iter()
                .position(|known| *known == name)
                .ok_or_else(|| StartupError::UnknownOption {
                    name: name.to_owned(),
                })?;
            if values[index].replace(value.as_ref()).is_some() {
                return Err(StartupError::DuplicateOption {
                    name: name.to_owned(),
                });
            }
        }
        let [
            startup,
            min,
            max,
            node_id,
            node_name,
            pg_version,
            formats,
            forward,
            streaming,
        ] = values;
        let startup_version =
            parse_u32(STARTUP_VERSION_OPT, required(STARTUP_VERSION_OPT, startup)?)?;
        if startup_version != STARTUP_VERSION {
            let server = VersionRange {
                min: STARTUP_VERSION,
                max: STARTUP_VERSION,
            };
            return Err(StartupError::UnsupportedStartupVersion {
                client: startup_version,
                server,
            });
        }
        Ok(StartupOptions {
            startup_version,
            proto_versions: VersionRange {
                min: parse_u32(MIN_PROTO_VERSION, required(MIN_PROTO_VERSION, min)?)?,
                max: parse_u32(MAX_PROTO_VERSION, required(MAX_PROTO_VERSION, max)?)?,
            },
            node_id: parse_u64(NODE_ID, required(NODE_ID, node_id)?)?,
            node_name: parse_name(required(NODE_NAME, node_name)?)?,
            pg_version_num: parse_u32(PG_VERSION_NUM, required(PG_VERSION_NUM, pg_version)?)?,
            datum_formats: formats.map_or(Ok(DatumFormats::TEXT), parse_formats)?,
            forward_origins: forward.map_or(Ok(false), |v| parse_bool(FORWARD_ORIGINS, v))?,
            streaming: streaming.map_or(Ok(false), |v| parse_bool(STREAMING, v))?,
        })
    }

    /// Checks these options against this crate's versions and the
    /// server's `server_version_num`, and chooses the protocol version and
    /// datum formats for the stream.
    pub fn negotiate(&self, server_pg_version_num: u32) -> Result<Negotiated, StartupError> {
        if self.startup_version != STARTUP_VERSION {
            let server = VersionRange {
                min: STARTUP_VERSION,
                max: STARTUP_VERSION,
            };
            return Err(StartupError::UnsupportedStartupVersion {
                client: self.startup_version,
                server,
            });
        }
        let proto_version = negotiate_version(self.proto_versions, PROTOCOL_VERSIONS)?;
        if self.streaming && proto_version < 2 {
            return Err(StartupError::StreamingNeedsVersion2 {
                chosen: proto_version,
            });
        }
        let same_major = pg_major(self.pg_version_num) == pg_major(server_pg_version_num);
        let datum_formats = if same_major && self.datum_formats.contains(DatumFormats::BINARY) {
            DatumFormats::TEXT.union(DatumFormats::BINARY)
        } else {
            DatumFormats::TEXT
        };
        Ok(Negotiated {
            proto_version,
            datum_formats,
        })
    }
}

fn required<'v>(name: &'static str, value: Option<&'v str>) -> Result<&'v str, StartupError> {
    value.ok_or(StartupError::MissingOption { name })
}

fn malformed(name: &'static str, value: &str, expected: &'static str) -> StartupError {
    StartupError::MalformedOption {
        name,
        value: value.to_owned(),
        expected,
    }
}

fn parse_u64(name: &'static str, value: &str) -> Result<u64, StartupError> {
    let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    let parsed = if digits { value.parse().ok() } else { None };
    parsed.ok_or_else(|| malformed(name, value, "a decimal integer"))
}

fn parse_u32(name: &'static str, value: &str) -> Result<u32, StartupError> {
    let wide = parse_u64(name, value)?;
    u32::try_from(wide).map_err(|_| malformed(name, value, "a decimal integer below 2^32"))
}

fn parse_name(value: &str) -> Result<String, StartupError> {
    if value.is_empty() {
        return Err(malformed(NODE_NAME, value, "a non-empty name"));
    }
    Ok(value.to_owned())
}

fn parse_bool(name: &'static str, value: &str) -> Result<bool, StartupError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(malformed(name, value, "true or false")),
    }
}

fn parse_formats(value: &str) -> Result<DatumFormats, StartupError> {
    const EXPECTED: &str = "a comma-separated list of text and binary, including text";
    let mut formats = DatumFormats(0);
    for item in value.split(',') {
        let format = match item {
            "text" => DatumFormats::TEXT,
            "binary" => DatumFormats::BINARY,
            _ => return Err(malformed(DATUM_FORMATS, value, EXPECTED)),
        };
        if formats.contains(format) {
            return Err(malformed(DATUM_FORMATS, value, EXPECTED));
        }
        formats = formats.union(format);
    }
    if !formats.contains(DatumFormats::TEXT) {
        return Err(malformed(DATUM_FORMATS, value, EXPECTED));
    }
    Ok(formats)
}
