//! Wake-ups for the transactions of parallel apply that wait for another
//! session's: condition variables in shared memory.
//!
//! A transaction of `bdr.apply_transactions` that depends on one applied
//! by another session waits, before its first change, until that
//! session's replication origin is at the other transaction's end LSN
//! (`apply::sleep_for`). It sleeps on the condition variable of that
//! origin ([`variable`]: one of [`VARIABLES`], by origin id), which the
//! other session broadcasts on once an ordered transaction of its call
//! has committed ([`committed`]); a broadcast costs a spinlock when
//! nobody sleeps. A transaction committed some other way (sent as
//! statements) broadcasts nothing: the sleeper looks at the origin again
//! every millisecond anyway.
//!
//! The waiting transaction holds no lock while it sleeps (it has applied
//! nothing, and gives back the tables its session holds first), so no
//! cycle of waits can go through it, and the condition variable, which
//! PostgreSQL's deadlock detector does not see, hides none.
//!
//! The variables exist only when the library is loaded through
//! `shared_preload_libraries` (as the output plugin requires); without
//! them the sleeper only looks every millisecond.

use pgrx::prelude::*;

/// How many condition variables there are: origins share them modulo
/// this (a sleeper woken for another origin looks and sleeps again).
const VARIABLES: usize = 64;

/// The name of the shared memory area.
const AREA: &std::ffi::CStr = c"bdr apply wake-ups";

/// The variables, set up by the library's shared memory start-up hook in
/// the postmaster and inherited by every backend; null without it.
static mut VARS: *mut pg_sys::ConditionVariable = std::ptr::null_mut();

/// The shared memory the variables take.
pub fn shmem_bytes() -> usize {
    VARIABLES * size_of::<pg_sys::ConditionVariable>()
}

/// Makes or finds the variables.
///
/// # Safety
/// Must run in the library's shared memory start-up hook.
pub unsafe fn attach() {
    // SAFETY: per the contract.
    unsafe {
        let area = crate::pg::shared_area(AREA, shmem_bytes(), |area| {
            let vars = area.cast::<pg_sys::ConditionVariable>();
            for i in 0..VARIABLES {
                pg_sys::ConditionVariableInit(vars.add(i));
            }
        });
        VARS = area.cast();
    }
}

/// The condition variable of replication origin `origin`; null when the
/// library was not preloaded.
pub fn variable(origin: pg_sys::RepOriginId) -> *mut pg_sys::ConditionVariable {
    // SAFETY: set once by the postmaster before any backend starts; the
    // index is below VARIABLES.
    unsafe {
        let vars = VARS;
        if vars.is_null() {
            return vars;
        }
        vars.add(usize::from(origin) % VARIABLES)
    }
}

/// Wakes the transactions waiting for one of origin `origin`, which has
/// just committed one.
///
/// # Safety
/// Must run in a backend.
pub unsafe fn committed(origin: pg_sys::RepOriginId) {
    let cv = variable(origin);
    if !cv.is_null() {
        // SAFETY: per the contract; a variable in shared memory.
        unsafe { pg_sys::ConditionVariableBroadcast(cv) };
    }
}
