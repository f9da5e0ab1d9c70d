//! Column values: how each column of a table travels, chosen once per
//! relation (no catalog lookup per row), and the encoding of a tuple.
//!
//! - Built-in types (OID below `FirstNormalObjectId`) travel in their
//!   binary send format when the stream negotiated binary. The common
//!   fixed-width types are encoded here directly from the `Datum`, with
//!   the same bytes their send functions produce (`int4send`, `float8send`,
//!   `timestamp_send`, ... in utils/adt); `int2`/`int4`/`int8` use the
//!   protocol's compact integer datum. Other built-in types go through
//!   their send function (`SendFunctionCall` on a cached `FmgrInfo`).
//! - `text`, `varchar` and `bpchar` travel as text straight from the
//!   varlena (their output is their content); `bpchar` padding is counted,
//!   not sent.
//! - Every other type (user-defined types, arrays and composites of them,
//!   domains, enums, built-in types without a send function, and all types
//!   when the stream is text-only) travels as the text of its output
//!   function, converted to UTF-8.
//! - A TOASTed value that an UPDATE did not change is still an on-disk
//!   TOAST pointer in the decoded tuple (reorderbuffer.c only reassembles
//!   the chunks logged in the transaction): it is sent as the "unchanged
//!   TOAST" marker, never fetched. Other external or compressed values are
//!   detoasted by the send/output functions or here.
//!
//! Text output depends on session settings; the stream pins them at
//! startup (see `startup.rs`).

use std::ffi::CStr;

use bdr_protocol::{Column, Datum, QualifiedName, TupleWriter};
use pgrx::pg_sys;

use crate::pg;
use crate::relation::needs_type_name;

// Built-in type OIDs (catalog/pg_type.dat).
const BOOLOID: u32 = 16;
const INT8OID: u32 = 20;
const INT2OID: u32 = 21;
const INT4OID: u32 = 23;
const TEXTOID: u32 = 25;
const OIDOID: u32 = 26;
const FLOAT4OID: u32 = 700;
const FLOAT8OID: u32 = 701;
const BPCHAROID: u32 = 1042;
const VARCHAROID: u32 = 1043;
const DATEOID: u32 = 1082;
const TIMEOID: u32 = 1083;
const TIMESTAMPOID: u32 = 1114;
const TIMESTAMPTZOID: u32 = 1184;
const UUIDOID: u32 = 2950;

/// How a column's value is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `int2`, `int4`, `int8`: the protocol's integer datum.
    Int,
    /// `bool`: one byte (`boolsend`).
    Bool,
    /// 4-byte big-endian value of the datum's low bits (`float4send`,
    /// `date_send`, `oidsend`).
    Be32,
    /// 8-byte big-endian value (`float8send`, `time_send`,
    /// `timestamp_send`, `timestamptz_send`).
    Be64,
    /// `uuid`: its 16 bytes (`uuid_send`).
    Uuid,
    /// `text`, `varchar`: the varlena's content as text.
    RawText,
    /// `bpchar`: the content as text with the padding counted.
    RawPadded,
    /// The type's send function.
    Send,
    /// The type's output function.
    Output,
}

/// One sent column of a relation.
#[derive(Debug)]
pub struct ColumnOut {
    /// Index of the attribute in the tuple descriptor.
    pub index: usize,
    /// The column's name.
    pub name: String,
    /// The column's type.
    pub type_oid: pg_sys::Oid,
    /// The column's type modifier.
    pub typmod: i32,
    /// Schema and name of a type that is not built in.
    pub type_name: Option<(String, String)>,
    /// Part of the replica identity.
    pub key: bool,
    /// `attlen == -1`: the value may be TOASTed.
    pub varlena: bool,
    /// How values are encoded.
    pub encoding: Encoding,
    /// The send or output function, for [`Encoding::Send`] and
    /// [`Encoding::Output`].
    finfo: pg_sys::FmgrInfo,
}

impl ColumnOut {
    /// Describes attribute `att` (at `index` in the descriptor), looking
    /// its type up once.
    ///
    /// # Safety
    /// Must run in a transaction (syscache); `cxt` must outlive the column.
    pub unsafe fn new(
        index: usize,
        att: &pg_sys::FormData_pg_attribute,
        key: bool,
        binary: bool,
        utf8_db: bool,
        cxt: pg_sys::MemoryContext,
    ) -> Self {
        let type_oid = att.atttypid;
        // SAFETY: per the contract.
        let (send_fn, output_fn, type_name) = unsafe { type_info(type_oid, utf8_db) };
        let encoding = choose_encoding(type_oid.to_u32(), binary, send_fn != pg_sys::InvalidOid);
        let mut finfo = pg_sys::FmgrInfo::default();
        let function = match encoding {
            Encoding::Send => send_fn,
            Encoding::Output => output_fn,
            _ => pg_sys::InvalidOid,
        };
        if function != pg_sys::InvalidOid {
            // SAFETY: fmgr_info_cxt fills finfo, allocating in cxt.
            unsafe { pg_sys::fmgr_info_cxt(function, &mut finfo, cxt) };
        }
        ColumnOut {
            index,
            name: pg::name_str(&att.attname, utf8_db),
            type_oid,
            typmod: att.atttypmod,
            type_name: needs_type_name(type_oid).then_some(type_name),
            key,
            varlena: att.attlen == -1,
            encoding,
            finfo,
        }
    }

    /// The column as RELATION describes it.
    pub fn describe(&self) -> Column<'_> {
        Column {
            key: self.key,
            name: &self.name,
            type_oid: self.type_oid.to_u32(),
            type_name: self
                .type_name
                .as_ref()
                .map(|(schema, name)| QualifiedName { schema, name }),
            typmod: self.typmod,
        }
    }

    /// Appends one non-null value. `Err` if its text is not valid UTF-8.
    ///
    /// # Safety
    /// `value` must be a datum of this column's type, not an on-disk TOAST
    /// pointer; must run in the per-change memory context.
    pub unsafe fn write(
        &mut self,
        tuple: &mut TupleWriter<'_, Vec<u8>>,
        value: pg_sys::Datum,
        utf8_db: bool,
    ) -> Result<(), ()> {
        let bits = value.value() as u64;
        match self.encoding {
            Encoding::Int => {
                let v = match self.type_oid.to_u32() {
                    INT2OID => i64::from(bits as i16),
                    INT4OID => i64::from(bits as i32),
                    _ => bits as i64,
                };
                tuple.int(v);
            }
            Encoding::Bool => {
                tuple.binary(&[u8::from(bits != 0)]);
            }
            Encoding::Be32 => {
                tuple.binary(&(bits as u32).to_be_bytes());
            }
            Encoding::Be64 => {
                tuple.binary(&bits.to_be_bytes());
            }
            Encoding::Uuid => {
                // SAFETY: a uuid datum points to its 16 bytes (uuid.h).
                let bytes = unsafe { std::slice::from_raw_parts(value.cast_mut_ptr::<u8>(), 16) };
                tuple.binary(bytes);
            }
            // SAFETY: per the contract.
            Encoding::RawText | Encoding::RawPadded => unsafe {
                self.write_raw_text(tuple, value, utf8_db)?
            },
            Encoding::Send => {
                // SAFETY: finfo is the type's send function; it returns a
                // bytea palloc'd in the current (per-change) context.
                let bytes = unsafe {
                    let result = pg_sys::SendFunctionCall(&mut self.finfo, value);
                    pgrx::varlena::varlena_to_byte_slice(result.cast())
                };
                tuple.binary(bytes);
            }
            Encoding::Output => {
                // SAFETY: finfo is the type's output function; it returns a
                // NUL-terminated string palloc'd in the current context.
                let text = unsafe {
                    let cstr = pg_sys::OutputFunctionCall(&mut self.finfo, value);
                    pg::server_to_utf8(CStr::from_ptr(cstr).to_bytes(), utf8_db).ok_or(())?
                };
                tuple.text(text);
            }
        }
        Ok(())
    }

    unsafe fn write_raw_text(
        &self,
        tuple: &mut TupleWriter<'_, Vec<u8>>,
        value: pg_sys::Datum,
        utf8_db: bool,
    ) -> Result<(), ()> {
        // SAFETY: a text-like datum is a varlena; detoasting (decompress,
        // fetch an in-memory TOAST value) allocates in the current context.
        let text = unsafe {
            let varlena = pg_sys::pg_detoast_datum_packed(value.cast_mut_ptr());
            let bytes = std::slice::from_raw_parts(
                pgrx::varlena::vardata_any(varlena).cast::<u8>(),
                pgrx::varlena::varsize_any_exhdr(varlena),
            );
            pg::server_to_utf8(bytes, utf8_db).ok_or(())?
        };
        if self.encoding == Encoding::RawPadded {
            tuple.datum(Datum::text_trimmed(text));
        } else {
            tuple.text(text);
        }
        Ok(())
    }
}

/// The send function, output function and qualified name of a type
/// (one `pg_type` syscache lookup).
unsafe fn type_info(
    type_oid: pg_sys::Oid,
    utf8_db: bool,
) -> (pg_sys::Oid, pg_sys::Oid, (String, String)) {
    // SAFETY: syscache access inside a transaction; the tuple is released
    // before returning.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::TYPEOID as i32,
            pg_sys::Datum::from(type_oid),
        );
        if tuple.is_null() {
            pg::raise(
                pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!("bdr: cache lookup failed for type {}", type_oid.to_u32()),
                None,
            );
        }
        let form = &*pg::get_struct::<pg_sys::FormData_pg_type>(tuple);
        let schema = pg::cstr_to_string(pg_sys::get_namespace_name(form.typnamespace), utf8_db);
        let info = (
            form.typsend,
            form.typoutput,
            (schema, pg::name_str(&form.typname, utf8_db)),
        );
        pg_sys::ReleaseSysCache(tuple);
        info
    }
}

/// How values of type `oid` travel (see the module docs).
fn choose_encoding(oid: u32, binary: bool, has_send: bool) -> Encoding {
    match oid {
        TEXTOID | VARCHAROID => return Encoding::RawText,
        BPCHAROID => return Encoding::RawPadded,
        _ => {}
    }
    if !binary || oid >= bdr_protocol::FIRST_NORMAL_OBJECT_ID {
        return Encoding::Output;
    }
    match oid {
        INT2OID | INT4OID | INT8OID => Encoding::Int,
        BOOLOID => Encoding::Bool,
        FLOAT4OID | DATEOID | OIDOID => Encoding::Be32,
        FLOAT8OID | TIMEOID | TIMESTAMPOID | TIMESTAMPTZOID => Encoding::Be64,
        UUIDOID => Encoding::Uuid,
        _ if has_send => Encoding::Send,
        _ => Encoding::Output,
    }
}

/// Appends a tuple of `columns` from deformed `values`/`nulls`. On a value
/// whose text is not UTF-8, returns the index of its column.
///
/// # Safety
/// `values`/`nulls` must be the deformed tuple of the relation the columns
/// describe; must run in the per-change memory context.
pub unsafe fn write_tuple(
    buf: &mut Vec<u8>,
    columns: &mut [ColumnOut],
    values: &[pg_sys::Datum],
    nulls: &[bool],
    utf8_db: bool,
) -> Result<(), usize> {
    let mut tuple = TupleWriter::new(buf, columns.len());
    for (n, column) in columns.iter_mut().enumerate() {
        let (value, null) = (values[column.index], nulls[column.index]);
        if null {
            tuple.null();
        // SAFETY: a non-null varlena datum points to a varlena.
        } else if column.varlena && unsafe { pg::is_external_ondisk(value.cast_mut_ptr()) } {
            tuple.unchanged_toast();
        } else {
            // SAFETY: per the contract.
            unsafe { column.write(&mut tuple, value, utf8_db) }.map_err(|()| n)?;
        }
    }
    // The writer announced exactly columns.len() and wrote one datum each.
    let _ = tuple.finish();
    Ok(())
}
