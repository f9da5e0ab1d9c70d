//! Small wrappers over PostgreSQL's C API that the plugin uses in several
//! places: errors, memory contexts, text encoding, syscache structs.
//!
//! Everything here runs inside a backend (walsender or SQL function) on
//! PostgreSQL's single thread.

use std::ffi::{CStr, c_char};

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Raises an ERROR with a SQLSTATE, a message and an optional hint.
pub fn raise(code: PgSqlErrorCode, message: String, hint: Option<String>) -> ! {
    let mut report = ErrorReport::new(code, message, "bdr");
    if let Some(hint) = hint {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) returned")
}

/// The shared memory area `name` of `bytes` bytes, made by the first
/// caller (which runs `init` on it) and found by the others, under the
/// add-in area lock (AddinShmemInitLock, lwlocknames.h).
///
/// # Safety
/// Must run in a shared memory start-up hook; `init` must leave the area
/// ready for every backend.
pub unsafe fn shared_area(
    name: &CStr,
    bytes: usize,
    init: impl FnOnce(*mut std::ffi::c_void),
) -> *mut std::ffi::c_void {
    // SAFETY: per the contract; the lock is the one PostgreSQL's own
    // modules take around ShmemInitStruct.
    unsafe {
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let area = pg_sys::ShmemInitStruct(name.as_ptr(), bytes, &mut found);
        if !found {
            init(area);
        }
        pg_sys::LWLockRelease(lock);
        area
    }
}

/// Creates an AllocSet memory context under `parent` with the default
/// sizes (`ALLOCSET_DEFAULT_SIZES`, memutils.h).
///
/// # Safety
/// `parent` must be a live memory context.
pub unsafe fn new_context(
    parent: pg_sys::MemoryContext,
    name: &'static CStr,
) -> pg_sys::MemoryContext {
    // SAFETY: the name is static, as AllocSetContextCreate requires.
    unsafe {
        pg_sys::AllocSetContextCreateExtended(
            parent,
            name.as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        )
    }
}

/// Makes `cxt` the current memory context and returns the previous one
/// (`MemoryContextSwitchTo`, palloc.h, is a static inline function).
///
/// # Safety
/// `cxt` must be a live memory context.
pub unsafe fn switch_to(cxt: pg_sys::MemoryContext) -> pg_sys::MemoryContext {
    // SAFETY: single-threaded backend global.
    unsafe {
        std::mem::replace(
            &mut *std::ptr::addr_of_mut!(pg_sys::CurrentMemoryContext),
            cxt,
        )
    }
}

/// Whether the database encoding is UTF-8, so that server strings need no
/// conversion before they go on the wire (which carries UTF-8 only).
pub fn database_is_utf8() -> bool {
    thread_local! {
        static UTF8: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    }
    UTF8.with(|c| match c.get() {
        Some(utf8) => utf8,
        None => {
            // SAFETY: reads the backend's database encoding, set at
            // connection and fixed from then on.
            let utf8 = unsafe { pg_sys::GetDatabaseEncoding() == pg_sys::pg_enc::PG_UTF8 as i32 };
            c.set(Some(utf8));
            utf8
        }
    })
}

/// Server-encoded bytes as UTF-8 text: borrowed when the database is
/// UTF-8, converted (`pg_server_to_any`, mbutils.c) otherwise. Returns
/// `None` for bytes that are not valid in UTF-8 (only possible with
/// `SQL_ASCII` databases or corrupted data).
///
/// # Safety
/// Must run in a backend; a converted string is palloc'd in the current
/// memory context and lives as long as it.
pub unsafe fn server_to_utf8(bytes: &[u8], utf8_db: bool) -> Option<&str> {
    if utf8_db || bytes.is_ascii() {
        return std::str::from_utf8(bytes).ok();
    }
    let len = i32::try_from(bytes.len()).ok()?;
    // SAFETY: pg_server_to_any reads len bytes and returns either its
    // input or a palloc'd, NUL-terminated conversion.
    let converted = unsafe {
        let p =
            pg_sys::pg_server_to_any(bytes.as_ptr().cast(), len, pg_sys::pg_enc::PG_UTF8 as i32);
        if p.cast_const() == bytes.as_ptr().cast() {
            return std::str::from_utf8(bytes).ok();
        }
        CStr::from_ptr(p).to_bytes()
    };
    std::str::from_utf8(converted).ok()
}

/// A NUL-terminated server string as UTF-8, lossily (identifiers and
/// names, where a replacement character beats an error).
///
/// # Safety
/// `p` must point to a NUL-terminated string.
pub unsafe fn cstr_to_string(p: *const c_char, utf8_db: bool) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: per the contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    // SAFETY: as above.
    match unsafe { server_to_utf8(bytes, utf8_db) } {
        Some(s) => s.to_owned(),
        None => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// A `NameData` as a string.
pub fn name_str(name: &pg_sys::NameData, utf8_db: bool) -> String {
    // SAFETY: NameData is NUL-terminated within its 64 bytes.
    unsafe { cstr_to_string(name.data.as_ptr(), utf8_db) }
}

/// The struct part of a heap tuple (`GETSTRUCT`, htup_details.h).
///
/// # Safety
/// `tuple` must be a valid heap tuple whose data is a `T`.
pub unsafe fn get_struct<T>(tuple: pg_sys::HeapTuple) -> *mut T {
    // SAFETY: per the contract; t_hoff is the offset of the user data.
    unsafe {
        let header = (*tuple).t_data;
        header
            .cast::<u8>()
            .add(usize::from((*header).t_hoff))
            .cast()
    }
}

/// Whether a varlena datum is a pointer to a value stored out of line
/// in a TOAST table (`VARATT_IS_EXTERNAL_ONDISK`, varatt.h/postgres.h):
/// a 1-byte header of 0x01 followed by the tag `VARTAG_ONDISK`.
///
/// # Safety
/// `ptr` must point to a varlena.
pub unsafe fn is_external_ondisk(ptr: *const u8) -> bool {
    // SAFETY: an external varlena has at least two header bytes; any
    // other varlena has at least one, and the second is only read when
    // the first says external (little-endian 1-byte external header).
    unsafe { *ptr == 0x01 && u32::from(*ptr.add(1)) == pg_sys::vartag_external::VARTAG_ONDISK }
}

/// Answers of catalog look-ups kept per backend (in a `thread_local!`)
/// until a change to the catalogs they came from: the owner registers a
/// catalog cache callback that calls [`CatalogMemo::forget`]. An answer
/// looked up while the catalogs changed is not kept.
pub struct CatalogMemo<K, V> {
    entries: std::cell::RefCell<Vec<(K, V)>>,
    /// Whether the owner's callback is registered.
    watching: std::cell::Cell<bool>,
    /// How many times [`CatalogMemo::forget`] ran.
    generation: std::cell::Cell<u64>,
}

/// At most this many answers are kept: what they answer about (origins,
/// key types) is few.
const MEMO_ENTRIES: usize = 64;

impl<K: Copy + PartialEq, V: Copy> CatalogMemo<K, V> {
    pub const fn new() -> Self {
        CatalogMemo {
            entries: std::cell::RefCell::new(Vec::new()),
            watching: std::cell::Cell::new(false),
            generation: std::cell::Cell::new(0),
        }
    }

    /// The answer kept for `key`, else `look_up`'s, kept unless the
    /// catalogs changed meanwhile. On first use, registers `forget` (which
    /// must call [`CatalogMemo::forget`] on this memo) for each of
    /// `caches`.
    ///
    /// # Safety
    /// Must run in a backend, in a transaction (for `look_up`).
    pub unsafe fn get_or_look_up(
        &self,
        key: K,
        caches: &[pg_sys::SysCacheIdentifier::Type],
        forget: pg_sys::SyscacheCallbackFunction,
        look_up: impl FnOnce() -> V,
    ) -> V {
        if let Some(value) = self
            .entries
            .borrow()
            .iter()
            .find(|(k, _)| *k == key)
            .map(|e| e.1)
        {
            return value;
        }
        let generation = self.generation.get();
        let value = look_up();
        if self.watching.get() && self.generation.get() != generation {
            return value;
        }
        if !self.watching.get() {
            for &cache in caches {
                // SAFETY: in a backend, per the contract; registered once.
                unsafe {
                    pg_sys::CacheRegisterSyscacheCallback(
                        cache as i32,
                        forget,
                        pg_sys::Datum::from(0usize),
                    );
                }
            }
            self.watching.set(true);
        }
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= MEMO_ENTRIES {
            entries.clear();
        }
        entries.push((key, value));
        value
    }

    /// Drops every kept answer (the catalogs changed).
    pub fn forget(&self) {
        self.entries.borrow_mut().clear();
        self.generation.set(self.generation.get() + 1);
    }
}
