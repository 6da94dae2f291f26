//! Allocation quotas: per user and in total (coturn's `user-quota` and `total-quota`).
//!
//! The core asks a [`QuotaLedger`] before creating an allocation and tells it when one ends.
//! [`LocalQuota`] counts within one `Server`; [`SharedQuota`] shares one ledger between the
//! shards of a multi-threaded server (touched on Allocate and expiry only, never per packet).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Which quota was hit.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum QuotaExceeded {
    /// The user already holds `per_user` allocations (→ 486).
    User,
    /// The server holds `total` allocations (→ 508).
    Total,
}

/// Counts allocations against quotas.
pub trait QuotaLedger: Send {
    /// Takes one allocation for `user`, or says which quota forbids it.
    ///
    /// # Errors
    /// A quota is exhausted.
    fn try_acquire(&mut self, user: &str) -> Result<(), QuotaExceeded>;
    /// Gives one allocation of `user` back.
    fn release(&mut self, user: &str);
}

/// Quota limits and counts. `None` means unlimited.
#[derive(Clone, Debug, Default)]
pub struct LocalQuota {
    /// Most allocations per username.
    pub per_user: Option<u32>,
    /// Most allocations in total.
    pub total: Option<u32>,
    counts: HashMap<Box<str>, u32>,
    in_use: u32,
}

impl LocalQuota {
    /// A ledger with these limits.
    #[must_use]
    pub fn new(per_user: Option<u32>, total: Option<u32>) -> Self {
        Self {
            per_user,
            total,
            ..Self::default()
        }
    }

    /// Allocations currently counted.
    #[must_use]
    pub fn in_use(&self) -> u32 {
        self.in_use
    }
}

impl QuotaLedger for LocalQuota {
    fn try_acquire(&mut self, user: &str) -> Result<(), QuotaExceeded> {
        if self.total.is_some_and(|t| self.in_use >= t) {
            return Err(QuotaExceeded::Total);
        }
        let n = self.counts.get(user).copied().unwrap_or(0);
        if self.per_user.is_some_and(|q| n >= q) {
            return Err(QuotaExceeded::User);
        }
        *self.counts.entry(user.into()).or_insert(0) += 1;
        self.in_use += 1;
        Ok(())
    }

    fn release(&mut self, user: &str) {
        if let Some(n) = self.counts.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(user);
            }
            self.in_use -= 1;
        }
    }
}

/// A [`LocalQuota`] shared between shards.
#[derive(Clone, Debug, Default)]
pub struct SharedQuota(pub Arc<Mutex<LocalQuota>>);

impl QuotaLedger for SharedQuota {
    fn try_acquire(&mut self, user: &str) -> Result<(), QuotaExceeded> {
        match self.0.lock() {
            Ok(mut q) => q.try_acquire(user),
            Err(poisoned) => poisoned.into_inner().try_acquire(user),
        }
    }

    fn release(&mut self, user: &str) {
        match self.0.lock() {
            Ok(mut q) => q.release(user),
            Err(poisoned) => poisoned.into_inner().release(user),
        }
    }
}
