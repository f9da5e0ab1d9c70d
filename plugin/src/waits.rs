//! Wake-ups for the transactions of parallel apply that wait for another
//! session's: condition variables in shared memory.
//!
//! A transaction of `bdr.apply_transactions` that depends on one applied
//! by another session waits, before its first change, until that
//! session's replication origin is at the other transaction's end LSN
//! (`apply::sleep_for`). It sleeps on the condition variable of that
//! origin ([`slot`]: one of [`SLOTS`], by origin id), after
//! lowering the slot's wanted LSN to that end ([`Slot::want`]). The
//! other session, once an ordered transaction of its call has
//! committed, broadcasts on the variable only when that transaction ends
//! at or past the wanted LSN ([`committed`]), and sets the wanted LSN
//! back to none: a sleeper is woken when what it waits for may have
//! come, not at every commit of the other session (a wait can last
//! hundreds of them, each a signal and a wake-up). A woken sleeper looks
//! at the origin, and lowers the wanted LSN again before it sleeps
//! again. A transaction committed some other way (sent as statements)
//! wakes nobody: the sleeper looks at the origin every millisecond
//! anyway.
//!
//! No wake-up is lost: the sleeper lowers the wanted LSN before it reads
//! the origin's progress, the committing session advances the progress
//! (at its commit) before it reads the wanted LSN, and both reads and
//! writes of the progress take the origin's spinlock, so either the
//! sleeper sees the new progress or the committing session sees the
//! sleeper's LSN. Origins that share a slot share its wanted LSN, whose
//! positions then mix two peers' WAL: that only wakes sleepers for
//! nothing.
//!
//! The waiting transaction holds no lock while it sleeps (it has applied
//! nothing, and gives back the tables its session holds first), so no
//! cycle of waits can go through it, and the condition variable, which
//! PostgreSQL's deadlock detector does not see, hides none.
//!
//! The slots exist only when the library is loaded through
//! `shared_preload_libraries` (as the output plugin requires); without
//! them the sleeper only looks every millisecond.

use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::prelude::*;

/// How many slots there are: origins share them modulo this.
const SLOTS: usize = 64;

/// No sleeper wants a position.
const NONE: u64 = u64::MAX;

/// The name of the shared memory area.
const AREA: &std::ffi::CStr = c"bdr apply wake-ups";

/// What the sleepers for the origins of one slot wait on, in shared
/// memory.
#[repr(C)]
struct SlotData {
    /// What they sleep on.
    variable: pg_sys::ConditionVariable,
    /// The lowest end LSN one of them waits for, or [`NONE`].
    wanted: AtomicU64,
}

/// A slot (shared memory that other processes change: reached through
/// its pointer, never a reference to the whole).
#[derive(Clone, Copy)]
pub struct Slot(*mut SlotData);

impl Slot {
    /// The condition variable the sleepers sleep on.
    pub fn variable(self) -> *mut pg_sys::ConditionVariable {
        // SAFETY: the slot lives in shared memory as long as the server.
        unsafe { &raw mut (*self.0).variable }
    }

    fn wanted(self) -> &'static AtomicU64 {
        // SAFETY: as above; an atomic is shared by reference.
        unsafe { &(*self.0).wanted }
    }

    /// Notes that a sleeper waits for a transaction ending at `lsn`;
    /// before each look at the origin's progress.
    pub fn want(self, lsn: u64) {
        self.wanted().fetch_min(lsn, Ordering::SeqCst);
    }
}

/// The slots, set up by the library's shared memory start-up hook in the
/// postmaster and inherited by every backend; null without it.
static mut SLOTS_AT: *mut SlotData = std::ptr::null_mut();

/// The shared memory the slots take.
pub fn shmem_bytes() -> usize {
    SLOTS * size_of::<SlotData>()
}

/// Makes or finds the slots.
///
/// # Safety
/// Must run in the library's shared memory start-up hook.
pub unsafe fn attach() {
    // SAFETY: per the contract.
    unsafe {
        let area = crate::pg::shared_area(AREA, shmem_bytes(), |area| {
            let slots = area.cast::<SlotData>();
            for i in 0..SLOTS {
                let slot = slots.add(i);
                pg_sys::ConditionVariableInit(&raw mut (*slot).variable);
                (&raw mut (*slot).wanted).write(AtomicU64::new(NONE));
            }
        });
        SLOTS_AT = area.cast();
    }
}

/// The slot of replication origin `origin`; `None` when the library was
/// not preloaded.
pub fn slot(origin: pg_sys::RepOriginId) -> Option<Slot> {
    // SAFETY: set once by the postmaster before any backend starts; the
    // index is below SLOTS.
    unsafe {
        let slots = SLOTS_AT;
        (!slots.is_null()).then(|| Slot(slots.add(usize::from(origin) % SLOTS)))
    }
}

/// Origin `origin` has just committed a transaction ending at `end_lsn`:
/// wakes its sleepers if one of them may wait for it.
///
/// # Safety
/// Must run in a backend.
pub unsafe fn committed(origin: pg_sys::RepOriginId, end_lsn: u64) {
    let Some(slot) = slot(origin) else {
        return;
    };
    if slot.wanted().load(Ordering::SeqCst) <= end_lsn {
        slot.wanted().store(NONE, Ordering::SeqCst);
        // SAFETY: per the contract; a variable in shared memory.
        unsafe { pg_sys::ConditionVariableBroadcast(slot.variable()) };
    }
}
