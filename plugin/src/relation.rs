//! The per-stream relation cache: for every table a stream has touched,
//! its stream-local id, its RELATION message, and how each column's value
//! is encoded.
//!
//! Invariants:
//! - Ids are assigned from 1 upward in order of first use within the
//!   stream and never reused; a table keeps its id for the whole stream,
//!   also across ALTER TABLE.
//! - RELATION for an id is sent before the first change that uses it and
//!   again whenever the table's description changes. A relcache
//!   invalidation (registered once per backend with
//!   `CacheRegisterRelcacheCallback`, as pgoutput.c does) marks the entry
//!   stale; the next change rebuilds it and re-sends RELATION only if its
//!   encoded bytes differ (many invalidations, e.g. from CREATE INDEX or
//!   VACUUM, do not change anything a receiver sees).
//! - During decoding the relation passed to a callback is the historic
//!   version that matches the tuple (logical decoding's time travel,
//!   reorderbuffer.c), and invalidations are replayed in commit order, so a
//!   valid entry always describes the tuples being decoded. The column
//!   count is checked on every change as a safety net.
//!
//! Dropped (`attisdropped`) and generated (`attgenerated`) columns are
//! neither described nor sent.

use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicPtr, Ordering};

use bdr_protocol::{
    Column, FIRST_NORMAL_OBJECT_ID, QualifiedName, RelId, ReplicaIdentity, write_relation_parts,
};
use pgrx::pg_sys;

use crate::datum::ColumnOut;
use crate::pg;

/// The schema of the extension's catalog, whose tables are not replicated.
const EXTENSION_SCHEMA: &str = "bdr";

/// One table as the stream describes it.
#[derive(Debug)]
pub struct RelEntry {
    /// The stream-local id.
    pub rel_id: RelId,
    /// False after a relcache invalidation: rebuild before use.
    pub valid: bool,
    /// `schema.name`, for error messages.
    pub display_name: String,
    /// A table of the extension's own schema (`bdr.nodes`, ...): each
    /// node's copy is its own, so its changes are never sent.
    pub local_only: bool,
    /// The replica identity as sent (`Nothing` when the table has no
    /// usable identity, e.g. DEFAULT without a primary key).
    pub identity: ReplicaIdentity,
    /// Number of attributes in the tuple descriptor, dropped ones included.
    pub natts: usize,
    /// The columns that are sent, in attribute order.
    pub columns: Vec<ColumnOut>,
    /// The last RELATION message sent for this entry.
    pub sent: Option<Vec<u8>>,
    /// The RELATION message built by the last rebuild, until compared.
    pending: Vec<u8>,
    /// Holds the output functions' `FmgrInfo` data; reset on rebuild.
    cxt: pg_sys::MemoryContext,
}

/// The tables of one stream, by OID.
#[derive(Debug)]
pub struct RelCache {
    entries: FxHashMap<pg_sys::Oid, RelEntry>,
    next_id: RelId,
    parent_cxt: pg_sys::MemoryContext,
    utf8_db: bool,
    binary: bool,
}

/// The cache of the stream being decoded in this backend, for the relcache
/// invalidation callback (a backend decodes one slot at a time). Null when
/// no stream is active.
static ACTIVE: AtomicPtr<RelCache> = AtomicPtr::new(std::ptr::null_mut());

impl RelCache {
    /// An empty cache whose entries allocate under `parent_cxt`.
    pub fn new(parent_cxt: pg_sys::MemoryContext, utf8_db: bool, binary: bool) -> Self {
        RelCache {
            entries: FxHashMap::default(),
            next_id: 1,
            parent_cxt,
            utf8_db,
            binary,
        }
    }

    /// Makes this cache the target of relcache invalidations. The cache
    /// must not move until [`RelCache::deactivate`].
    pub fn activate(&mut self) {
        register_invalidation_callback();
        ACTIVE.store(self, Ordering::Relaxed);
    }

    /// Stops invalidations from reaching this cache.
    pub fn deactivate(&mut self) {
        let me: *mut RelCache = self;
        let _ = ACTIVE.compare_exchange(
            me,
            std::ptr::null_mut(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The up-to-date entry for `rel`, and whether a RELATION message
    /// must be sent for it (first use, or a changed description).
    ///
    /// # Safety
    /// `rel` must be a valid open relation; must run in the decoding
    /// transaction (catalog access).
    pub unsafe fn get(&mut self, rel: pg_sys::Relation) -> (&mut RelEntry, bool) {
        // SAFETY: per the contract.
        let entry = unsafe { self.refresh(rel) };
        let send = entry.take_relation_change();
        (entry, send)
    }

    /// The up-to-date entry for `rel`, rebuilt if it is new or stale; does
    /// not decide whether RELATION is sent.
    ///
    /// # Safety
    /// As for [`RelCache::get`].
    pub unsafe fn refresh(&mut self, rel: pg_sys::Relation) -> &mut RelEntry {
        // SAFETY: per the contract.
        let (oid, natts) = unsafe { ((*rel).rd_id, (*(*rel).rd_att).natts as usize) };
        let (utf8_db, binary, parent_cxt) = (self.utf8_db, self.binary, self.parent_cxt);
        let next_id = &mut self.next_id;
        let entry = self.entries.entry(oid).or_insert_with(|| {
            let rel_id = *next_id;
            *next_id += 1;
            // SAFETY: parent_cxt lives as long as the stream.
            let cxt = unsafe { pg::new_context(parent_cxt, c"bdr relation") };
            RelEntry::empty(rel_id, cxt)
        });
        if !entry.valid || entry.natts != natts {
            // SAFETY: per the contract.
            unsafe { entry.rebuild(rel, utf8_db, binary) };
        }
        entry
    }

    /// Forgets which descriptions were sent, so that the next change of
    /// every table sends its RELATION again (after output was dropped).
    pub fn forget_sent(&mut self) {
        for entry in self.entries.values_mut() {
            entry.sent = None;
            entry.valid = false;
        }
    }

    fn invalidate(&mut self, relid: pg_sys::Oid) {
        if relid == pg_sys::InvalidOid {
            self.entries.values_mut().for_each(|e| e.valid = false);
        } else if let Some(entry) = self.entries.get_mut(&relid) {
            entry.valid = false;
        }
    }
}

fn register_invalidation_callback() {
    static mut REGISTERED: bool = false;
    // SAFETY: single-threaded backend; the callback stays registered for
    // the life of the process (PostgreSQL offers no way to remove one),
    // and does nothing while no stream is active.
    unsafe {
        if !REGISTERED {
            pg_sys::CacheRegisterRelcacheCallback(
                Some(relcache_invalidated),
                pg_sys::Datum::from(0),
            );
            REGISTERED = true;
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn relcache_invalidated(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let cache = ACTIVE.load(Ordering::Relaxed);
    if !cache.is_null() {
        // SAFETY: ACTIVE only holds a live, pinned cache (see activate).
        unsafe { (*cache).invalidate(relid) };
    }
}

impl RelEntry {
    fn empty(rel_id: RelId, cxt: pg_sys::MemoryContext) -> Self {
        RelEntry {
            rel_id,
            valid: false,
            display_name: String::new(),
            local_only: false,
            identity: ReplicaIdentity::Nothing,
            natts: 0,
            columns: Vec::new(),
            sent: None,
            cxt,
            pending: Vec::new(),
        }
    }

    /// Reads the relation's description and encodes its RELATION message
    /// into `pending` (sent by the caller if it differs from `sent`).
    unsafe fn rebuild(&mut self, rel: pg_sys::Relation, utf8_db: bool, binary: bool) {
        // SAFETY: per RelCache::get's contract.
        unsafe {
            pg_sys::MemoryContextReset(self.cxt);
            let class = &*(*rel).rd_rel;
            let schema =
                pg::cstr_to_string(pg_sys::get_namespace_name(class.relnamespace), utf8_db);
            let name = pg::name_str(&class.relname, utf8_db);
            self.display_name = format!("{schema}.{name}");
            self.local_only = schema == EXTENSION_SCHEMA;
            let (identity, keys) = replica_identity(rel);
            self.identity = identity;
            let desc = (*rel).rd_att;
            self.natts = (*desc).natts as usize;
            self.columns.clear();
            for (index, att) in (*desc).attrs.as_slice(self.natts).iter().enumerate() {
                if att.attisdropped || att.attgenerated != 0 {
                    continue;
                }
                let key = match identity {
                    ReplicaIdentity::Full => true,
                    ReplicaIdentity::Nothing => false,
                    _ => is_member(keys, att.attnum),
                };
                let column = ColumnOut::new(index, att, key, binary, utf8_db, self.cxt);
                self.columns.push(column);
            }
            if !keys.is_null() {
                pg_sys::bms_free(keys);
            }
            self.pending.clear();
            let columns: Vec<Column<'_>> = self.columns.iter().map(ColumnOut::describe).collect();
            let qualified = QualifiedName {
                schema: &schema,
                name: &name,
            };
            write_relation_parts(
                &mut self.pending,
                self.rel_id,
                qualified,
                identity,
                &columns,
            );
        }
        self.valid = true;
    }

    /// True (once) if the RELATION message built by the last rebuild
    /// differs from the one last sent; it then becomes the sent one.
    fn take_relation_change(&mut self) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        let pending = std::mem::take(&mut self.pending);
        if self.sent.as_deref() == Some(pending.as_slice()) {
            return false;
        }
        self.sent = Some(pending);
        true
    }

    /// The column that the `index`th sent column describes, for messages.
    pub fn column_name(&self, index: usize) -> &str {
        self.columns.get(index).map_or("?", |c| c.name.as_str())
    }

    /// Whether UPDATE and DELETE of this table can be replicated.
    pub fn has_identity(&self) -> bool {
        self.identity != ReplicaIdentity::Nothing
    }
}

/// The replica identity and, for DEFAULT and USING INDEX, the key columns
/// (`RelationGetIndexAttrBitmap(INDEX_ATTR_BITMAP_IDENTITY_KEY)`,
/// relcache.c). DEFAULT without a primary key and USING INDEX of a dropped
/// index have no key: they are sent as NOTHING.
unsafe fn replica_identity(rel: pg_sys::Relation) -> (ReplicaIdentity, *mut pg_sys::Bitmapset) {
    // SAFETY: rel is a valid open relation.
    unsafe {
        let code = (*(*rel).rd_rel).relreplident as u8;
        match ReplicaIdentity::from_code(code) {
            Some(ReplicaIdentity::Full) => (ReplicaIdentity::Full, std::ptr::null_mut()),
            Some(identity @ (ReplicaIdentity::Default | ReplicaIdentity::Index)) => {
                let keys = pg_sys::RelationGetIndexAttrBitmap(
                    rel,
                    pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_IDENTITY_KEY,
                );
                if keys.is_null() {
                    (ReplicaIdentity::Nothing, keys)
                } else {
                    (identity, keys)
                }
            }
            _ => (ReplicaIdentity::Nothing, std::ptr::null_mut()),
        }
    }
}

fn is_member(keys: *mut pg_sys::Bitmapset, attnum: i16) -> bool {
    // Attribute bitmaps are offset by FirstLowInvalidHeapAttributeNumber
    // so that system columns fit (relcache.c, RelationGetIndexAttrBitmap).
    let member = i32::from(attnum) - pg_sys::FirstLowInvalidHeapAttributeNumber;
    // SAFETY: bms_is_member accepts NULL (the empty set).
    !keys.is_null() && unsafe { pg_sys::bms_is_member(member, keys) }
}

/// The type name a RELATION column carries for a type that is not built
/// in, whose OID differs between nodes.
pub fn needs_type_name(type_oid: pg_sys::Oid) -> bool {
    type_oid.to_u32() >= FIRST_NORMAL_OBJECT_ID
}
