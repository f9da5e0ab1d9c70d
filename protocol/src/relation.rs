//! RELATION: a table's description, bound to a small stream-local id.
//!
//! The sender assigns each table an id (a varint, so small ids take one
//! byte) and sends RELATION before the first change to that table in the
//! stream, and again whenever the table's definition changes; row changes
//! then name the table by id only. The receiver keeps a map from id to the
//! latest RELATION it received. Ids are local to one stream (one
//! connection): they mean nothing across reconnects.
//!
//! Column types are identified by OID. OIDs below 16384
//! (`FirstNormalObjectId`) are built-in and equal on every node of the
//! same major version; other types also carry their schema-qualified
//! name, which the receiver resolves to its own OID.

use bytes::BufMut;

use crate::error::DecodeError;
use crate::reader::{Reader, Result};
use crate::tuple::MAX_COLUMNS;
use crate::varint::{put_ivarint, put_len_prefixed, put_uvarint};
use crate::{Oid, RelId, tag};

const COLUMN_KEY: u8 = 0x01;
const COLUMN_TYPE_NAME: u8 = 0x02;

/// The first OID assigned to user objects (`FirstNormalObjectId`); types
/// with smaller OIDs are built in.
pub const FIRST_NORMAL_OBJECT_ID: Oid = 16384;

/// Which old values UPDATE and DELETE carry (`pg_class.relreplident`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// The primary key (`d`).
    Default,
    /// Nothing (`n`): updates and deletes cannot be replicated.
    Nothing,
    /// The whole old row (`f`).
    Full,
    /// The columns of a chosen unique index (`i`).
    Index,
}

impl ReplicaIdentity {
    /// The `relreplident` character, also used on the wire.
    pub const fn code(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }

    /// The replica identity for a `relreplident` character.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }
}

/// A schema-qualified name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QualifiedName<'a> {
    pub schema: &'a str,
    pub name: &'a str,
}

/// One column of a relation, in attribute order (dropped and generated
/// columns are not sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column<'a> {
    /// Part of the replica identity key.
    pub key: bool,
    /// The column's name.
    pub name: &'a str,
    /// The type's OID on the sending node.
    pub type_oid: Oid,
    /// The type's name, sent for types that are not built in
    /// (`type_oid >= FIRST_NORMAL_OBJECT_ID`), whose OIDs differ between
    /// nodes.
    pub type_name: Option<QualifiedName<'a>>,
    /// The type modifier (`atttypmod`, -1 for none).
    pub typmod: i32,
}

/// RELATION: a table's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation<'a> {
    /// The stream-local id that row changes use to name this table.
    pub rel_id: RelId,
    /// The table's schema (namespace).
    pub schema: &'a str,
    /// The table's name.
    pub name: &'a str,
    /// The table's replica identity.
    pub replica_identity: ReplicaIdentity,
    /// The table's columns, in the order tuples list them.
    pub columns: Vec<Column<'a>>,
}

/// Appends a RELATION message.
pub fn write_relation<B: BufMut + ?Sized>(buf: &mut B, relation: &Relation<'_>) {
    write_relation_parts(
        buf,
        relation.rel_id,
        QualifiedName {
            schema: relation.schema,
            name: relation.name,
        },
        relation.replica_identity,
        &relation.columns,
    );
}

/// Appends a RELATION message from its parts, for callers that keep the
/// columns in a slice of their own.
pub fn write_relation_parts<B: BufMut + ?Sized>(
    buf: &mut B,
    rel_id: RelId,
    name: QualifiedName<'_>,
    replica_identity: ReplicaIdentity,
    columns: &[Column<'_>],
) {
    buf.put_u8(tag::RELATION);
    put_uvarint(buf, rel_id.into());
    put_len_prefixed(buf, name.schema.as_bytes());
    put_len_prefixed(buf, name.name.as_bytes());
    buf.put_u8(replica_identity.code());
    put_uvarint(buf, columns.len() as u64);
    for column in columns {
        write_column(buf, column);
    }
}

fn write_column<B: BufMut + ?Sized>(buf: &mut B, column: &Column<'_>) {
    let mut flags = 0;
    if column.key {
        flags |= COLUMN_KEY;
    }
    if column.type_name.is_some() {
        flags |= COLUMN_TYPE_NAME;
    }
    buf.put_u8(flags);
    put_len_prefixed(buf, column.name.as_bytes());
    put_uvarint(buf, column.type_oid.into());
    put_ivarint(buf, column.typmod.into());
    if let Some(type_name) = column.type_name {
        put_len_prefixed(buf, type_name.schema.as_bytes());
        put_len_prefixed(buf, type_name.name.as_bytes());
    }
}

/// Reads a RELATION message's body (after the tag).
pub(crate) fn read_relation<'a>(r: &mut Reader<'a>) -> Result<Relation<'a>> {
    let rel_id = r.u32("relation id")?;
    let schema = r.str("relation schema")?;
    let name = r.str("relation name")?;
    let offset = r.pos();
    let code = r.u8()?;
    let replica_identity = ReplicaIdentity::from_code(code).ok_or(DecodeError::InvalidValue {
        field: "replica identity",
        value: code.into(),
        offset,
    })?;
    // A column takes at least 4 bytes: flags, name length, OID, typmod.
    let count = r.count("column count", MAX_COLUMNS, 4)?;
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        columns.push(read_column(r)?);
    }
    Ok(Relation {
        rel_id,
        schema,
        name,
        replica_identity,
        columns,
    })
}

fn read_column<'a>(r: &mut Reader<'a>) -> Result<Column<'a>> {
    let flags = r.flags("column flags", COLUMN_KEY | COLUMN_TYPE_NAME)?;
    let name = r.str("column name")?;
    let type_oid = r.u32("type OID")?;
    let typmod = r.i32("typmod")?;
    let type_name = if flags & COLUMN_TYPE_NAME != 0 {
        Some(QualifiedName {
            schema: r.str("type schema")?,
            name: r.str("type name")?,
        })
    } else {
        None
    };
    Ok(Column {
        key: flags & COLUMN_KEY != 0,
        name,
        type_oid,
        type_name,
        typmod,
    })
}
