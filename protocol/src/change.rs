//! Row changes (INSERT, UPDATE, DELETE) and TRUNCATE.
//!
//! A change names its table by the stream-local id of a RELATION sent
//! earlier in the stream. Tuples hold one datum per column of that
//! RELATION, in its column order.
//!
//! UPDATE carries the old row only when the receiver needs it to find the
//! row: the old key when the key changed (replica identity default or
//! index), the whole old row under replica identity full. DELETE always
//! carries one of the two.
//!
//! Two ways to encode: `write_insert(buf, rel_id, &datums)` and friends
//! take slices of [`Datum`]s; `write_insert_header(buf, rel_id)` and
//! friends write everything before the tuples, which the caller then
//! appends with [`crate::TupleWriter`] column by column.

use bytes::BufMut;

use crate::error::DecodeError;
use crate::reader::{MAX_LENGTH, Reader, Result};
use crate::tuple::{Datum, put_tuple, read_tuple};
use crate::varint::put_uvarint;
use crate::{RelId, tag};

const UPDATE_NO_OLD: u8 = b'N';
const TRUNCATE_CASCADE: u8 = 0x01;
const TRUNCATE_RESTART_IDENTITY: u8 = 0x02;

/// Which old values an UPDATE or DELETE carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OldKind {
    /// Only the replica identity key columns are set; the other columns
    /// are null (`K`).
    Key,
    /// The whole old row (`O`), under replica identity full.
    Full,
}

impl OldKind {
    /// The byte that marks this kind on the wire.
    pub const fn code(self) -> u8 {
        match self {
            OldKind::Key => b'K',
            OldKind::Full => b'O',
        }
    }

    const fn from_code(code: u8) -> Option<Self> {
        match code {
            b'K' => Some(OldKind::Key),
            b'O' => Some(OldKind::Full),
            _ => None,
        }
    }
}

/// The old values of an updated or deleted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldTuple<'a> {
    pub kind: OldKind,
    pub tuple: Vec<Datum<'a>>,
}

/// INSERT: a new row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert<'a> {
    pub rel_id: RelId,
    pub new: Vec<Datum<'a>>,
}

/// UPDATE: a changed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update<'a> {
    pub rel_id: RelId,
    /// The old key or old row, when sent (see the module docs).
    pub old: Option<OldTuple<'a>>,
    /// The new row; TOASTed columns that did not change are
    /// [`Datum::UnchangedToast`].
    pub new: Vec<Datum<'a>>,
}

/// DELETE: a removed row, identified by its old key or old row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete<'a> {
    pub rel_id: RelId,
    pub old: OldTuple<'a>,
}

/// TRUNCATE of one or more tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// `TRUNCATE ... CASCADE`.
    pub cascade: bool,
    /// `TRUNCATE ... RESTART IDENTITY`.
    pub restart_identity: bool,
    /// The truncated tables.
    pub rel_ids: Vec<RelId>,
}

/// Appends an INSERT's tag and relation id; a tuple must follow.
pub fn write_insert_header<B: BufMut + ?Sized>(buf: &mut B, rel_id: RelId) {
    buf.put_u8(tag::INSERT);
    put_uvarint(buf, rel_id.into());
}

/// Appends an UPDATE's tag, relation id and old-tuple marker; the old
/// tuple (if `old` is `Some`) and then the new tuple must follow.
pub fn write_update_header<B: BufMut + ?Sized>(buf: &mut B, rel_id: RelId, old: Option<OldKind>) {
    buf.put_u8(tag::UPDATE);
    put_uvarint(buf, rel_id.into());
    buf.put_u8(old.map_or(UPDATE_NO_OLD, OldKind::code));
}

/// Appends a DELETE's tag, relation id and old-tuple marker; the old tuple
/// must follow.
pub fn write_delete_header<B: BufMut + ?Sized>(buf: &mut B, rel_id: RelId, old: OldKind) {
    buf.put_u8(tag::DELETE);
    put_uvarint(buf, rel_id.into());
    buf.put_u8(old.code());
}

/// Appends an INSERT message.
pub fn write_insert<B: BufMut + ?Sized>(buf: &mut B, rel_id: RelId, new: &[Datum<'_>]) {
    write_insert_header(buf, rel_id);
    put_tuple(buf, new);
}

/// Appends an UPDATE message.
pub fn write_update<B: BufMut + ?Sized>(
    buf: &mut B,
    rel_id: RelId,
    old: Option<(OldKind, &[Datum<'_>])>,
    new: &[Datum<'_>],
) {
    write_update_header(buf, rel_id, old.map(|(kind, _)| kind));
    if let Some((_, tuple)) = old {
        put_tuple(buf, tuple);
    }
    put_tuple(buf, new);
}

/// Appends a DELETE message.
pub fn write_delete<B: BufMut + ?Sized>(
    buf: &mut B,
    rel_id: RelId,
    kind: OldKind,
    old: &[Datum<'_>],
) {
    write_delete_header(buf, rel_id, kind);
    put_tuple(buf, old);
}

/// Appends a TRUNCATE message.
pub fn write_truncate<B: BufMut + ?Sized>(
    buf: &mut B,
    cascade: bool,
    restart_identity: bool,
    rel_ids: &[RelId],
) {
    let mut flags = 0;
    if cascade {
        flags |= TRUNCATE_CASCADE;
    }
    if restart_identity {
        flags |= TRUNCATE_RESTART_IDENTITY;
    }
    buf.put_u8(tag::TRUNCATE);
    buf.put_u8(flags);
    put_uvarint(buf, rel_ids.len() as u64);
    for &rel_id in rel_ids {
        put_uvarint(buf, rel_id.into());
    }
}

/// Reads an INSERT message's body (after the tag).
pub(crate) fn read_insert<'a>(r: &mut Reader<'a>) -> Result<Insert<'a>> {
    let rel_id = r.u32("relation id")?;
    Ok(Insert {
        rel_id,
        new: read_tuple(r)?,
    })
}

fn old_kind(code: u8, offset: usize) -> Result<OldKind> {
    OldKind::from_code(code).ok_or(DecodeError::InvalidValue {
        field: "old tuple marker",
        value: code.into(),
        offset,
    })
}

/// Reads an UPDATE message's body (after the tag).
pub(crate) fn read_update<'a>(r: &mut Reader<'a>) -> Result<Update<'a>> {
    let rel_id = r.u32("relation id")?;
    let offset = r.pos();
    let old = match r.u8()? {
        UPDATE_NO_OLD => None,
        code => Some(OldTuple {
            kind: old_kind(code, offset)?,
            tuple: read_tuple(r)?,
        }),
    };
    Ok(Update {
        rel_id,
        old,
        new: read_tuple(r)?,
    })
}

/// Reads a DELETE message's body (after the tag).
pub(crate) fn read_delete<'a>(r: &mut Reader<'a>) -> Result<Delete<'a>> {
    let rel_id = r.u32("relation id")?;
    let offset = r.pos();
    let kind = old_kind(r.u8()?, offset)?;
    Ok(Delete {
        rel_id,
        old: OldTuple {
            kind,
            tuple: read_tuple(r)?,
        },
    })
}

/// Reads a TRUNCATE message's body (after the tag).
pub(crate) fn read_truncate(r: &mut Reader<'_>) -> Result<Truncate> {
    let flags = r.flags(
        "TRUNCATE flags",
        TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY,
    )?;
    let count = r.count("relation count", MAX_LENGTH, 1)?;
    let mut rel_ids = Vec::with_capacity(count);
    for _ in 0..count {
        rel_ids.push(r.u32("relation id")?);
    }
    Ok(Truncate {
        cascade: flags & TRUNCATE_CASCADE != 0,
        restart_identity: flags & TRUNCATE_RESTART_IDENTITY != 0,
        rel_ids,
    })
}
