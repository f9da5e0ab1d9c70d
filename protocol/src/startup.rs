//! The startup handshake: the client's options and the server's reply.
//!
//! ```text
//!  applier                                   plugin (walsender)
//!     | START_REPLICATION SLOT s LOGICAL lsn     |
//!     |   (startup_version '1', min_proto_version '1', ...)
//!     |----------------------------------------->| StartupOptions::from_pairs
//!     |                                          | StartupOptions::negotiate
//!     |          error: "client supports ..."    |  -> refuse, or
//!     |<-----------------------------------------|
//!     |          STARTUP (first message)         |  -> write_startup
//!     |<-----------------------------------------|
//!     |          BEGIN, RELATION, INSERT ...     |
//! ```
//!
//! The client's options travel as logical decoding plugin options: (name,
//! text value) pairs. The server answers with a STARTUP message as the
//! first message of every stream, stating what it chose.
//!
//! The handshake has its own version ([`STARTUP_VERSION`]), separate from
//! the stream protocol's: a client first learns which protocol version the
//! stream uses from the STARTUP message, so the STARTUP message itself
//! must be readable whatever that version is.

use std::fmt;

use bytes::BufMut;

use crate::error::DecodeError;
use crate::reader::{Reader, Result};
use crate::varint::{put_len_prefixed, put_uvarint};
use crate::{NodeId, PROTOCOL_VERSIONS, STARTUP_VERSION, tag};

mod options;

pub use options::{Negotiated, OPTION_NAMES, StartupError, StartupOptions};

/// An inclusive range of protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionRange {
    pub min: u32,
    pub max: u32,
}

impl VersionRange {
    /// True if `version` lies in the range.
    pub const fn contains(self, version: u32) -> bool {
        self.min <= version && version <= self.max
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.min, self.max)
    }
}

/// The datum formats a client accepts or a stream uses (a bit set).
///
/// Text is always accepted and used: types that are not built in travel
/// as text. Binary (the types' send/receive formats) is used only when the
/// client accepts it and both nodes run the same PostgreSQL major version,
/// because send formats may change between major versions.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DatumFormats(u8);

impl DatumFormats {
    /// The portable formats: text output ([`crate::Datum::Text`],
    /// [`crate::Datum::PaddedText`]) and integer values
    /// ([`crate::Datum::Int`], which mean the same in every version).
    pub const TEXT: DatumFormats = DatumFormats(0x01);
    /// The types' binary send format ([`crate::Datum::Binary`]).
    pub const BINARY: DatumFormats = DatumFormats(0x02);
    const ALL: u8 = 0x03;

    /// The set's bits, as sent on the wire.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The set for `bits`, or `None` if it holds an undefined bit.
    pub const fn from_bits(bits: u8) -> Option<Self> {
        if bits & !Self::ALL == 0 {
            Some(DatumFormats(bits))
        } else {
            None
        }
    }

    /// True if every format of `other` is in `self`.
    pub const fn contains(self, other: DatumFormats) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets' formats.
    pub const fn union(self, other: DatumFormats) -> Self {
        DatumFormats(self.0 | other.0)
    }

    /// The formats in both sets.
    pub const fn intersection(self, other: DatumFormats) -> Self {
        DatumFormats(self.0 & other.0)
    }
}

impl fmt::Debug for DatumFormats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatumFormats({self})")
    }
}

/// Formats as the option value: `text`, `binary`, `text,binary`.
impl fmt::Display for DatumFormats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [(Self::TEXT, "text"), (Self::BINARY, "binary")];
        let mut first = true;
        for (format, name) in names {
            if self.contains(format) {
                f.write_str(if first { "" } else { "," })?;
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

/// Negotiates the stream protocol version: the highest version both
/// ranges contain.
pub fn negotiate_version(
    client: VersionRange,
    server: VersionRange,
) -> std::result::Result<u32, StartupError> {
    let low = client.min.max(server.min);
    let high = client.max.min(server.max);
    if low <= high && client.min <= client.max {
        Ok(high)
    } else {
        Err(StartupError::VersionMismatch { client, server })
    }
}

/// STARTUP: the server's reply to the client's options, the first message
/// of every stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Startup<'a> {
    /// The stream protocol version chosen for this stream.
    pub proto_version: u32,
    /// The sending (server) node's identity.
    pub node_id: NodeId,
    /// The sending node's name.
    pub node_name: &'a str,
    /// The server's `server_version_num` (e.g. 150004 for 15.4).
    pub pg_version_num: u32,
    /// The database's encoding name (e.g. `UTF8`). Text datums are sent in
    /// UTF-8 whatever this is.
    pub database_encoding: &'a str,
    /// The datum formats the stream uses.
    pub datum_formats: DatumFormats,
}

impl Startup<'_> {
    /// The server's PostgreSQL major version (e.g. 15).
    pub const fn pg_major(&self) -> u32 {
        pg_major(self.pg_version_num)
    }
}

/// The major version of a `server_version_num` (10 and later).
pub const fn pg_major(version_num: u32) -> u32 {
    version_num / 10_000
}

/// Appends a STARTUP message.
pub fn write_startup<B: BufMut + ?Sized>(buf: &mut B, startup: &Startup<'_>) {
    buf.put_u8(tag::STARTUP);
    put_uvarint(buf, STARTUP_VERSION.into());
    put_uvarint(buf, startup.proto_version.into());
    put_uvarint(buf, startup.node_id);
    put_len_prefixed(buf, startup.node_name.as_bytes());
    put_uvarint(buf, startup.pg_version_num.into());
    put_len_prefixed(buf, startup.database_encoding.as_bytes());
    buf.put_u8(startup.datum_formats.bits());
}

fn read_version(r: &mut Reader<'_>, what: &'static str, supported: VersionRange) -> Result<u32> {
    let offset = r.pos();
    let version = r.uvarint()?;
    match u32::try_from(version) {
        Ok(v) if supported.contains(v) => Ok(v),
        _ => Err(DecodeError::UnsupportedVersion {
            what,
            version,
            min: supported.min,
            max: supported.max,
            offset,
        }),
    }
}

/// Reads a STARTUP message's body (after the tag).
pub(crate) fn read_startup<'a>(r: &mut Reader<'a>) -> Result<Startup<'a>> {
    let startup_versions = VersionRange {
        min: STARTUP_VERSION,
        max: STARTUP_VERSION,
    };
    read_version(r, "startup", startup_versions)?;
    let proto_version = read_version(r, "protocol", PROTOCOL_VERSIONS)?;
    let node_id = r.uvarint()?;
    let node_name = r.str("node name")?;
    let pg_version_num = r.u32("server version")?;
    let database_encoding = r.str("database encoding")?;
    let offset = r.pos();
    let bits = r.u8()?;
    let datum_formats = DatumFormats::from_bits(bits).ok_or(DecodeError::InvalidValue {
        field: "datum formats",
        value: bits.into(),
        offset,
    })?;
    Ok(Startup {
        proto_version,
        node_id,
        node_name,
        pg_version_num,
        database_encoding,
        datum_formats,
    })
}
