//! One memory budget for all symbol data together (`symbol_memory_limit`): file bytes read
//! into memory, decompressed sections, symbol tables, parsed DWARF units and remembered
//! answers of every loaded [`super::binary::Binary`]. Each holder keeps a [`Charge`] that
//! gives its bytes back when it drops, so a binary evicted from the caches but still in use
//! still counts. What does not fit degrades (DWARF dropped, then the symbol table) and the
//! reason is counted by [`Degraded`].

use std::{
    cell::Cell,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

/// Why a binary answers with less than it has: counted per event in
/// `profiler_symbols_degraded_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Degraded {
    /// The shared budget had no room left.
    Budget,
    /// A compressed section declared more than the cap, or inflated past what it declared.
    DecompressedTooLarge,
    /// More function symbols than [`Limits::max_symbols`].
    TooManySymbols,
    /// One DWARF unit parses into more rows and scopes than [`Limits::max_unit_bytes`].
    DwarfUnitTooLarge,
}

impl Degraded {
    pub const ALL: [Degraded; 4] = [
        Degraded::Budget,
        Degraded::DecompressedTooLarge,
        Degraded::TooManySymbols,
        Degraded::DwarfUnitTooLarge,
    ];

    /// The metric's `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Degraded::Budget => "budget",
            Degraded::DecompressedTooLarge => "decompressed_too_large",
            Degraded::TooManySymbols => "too_many_symbols",
            Degraded::DwarfUnitTooLarge => "dwarf_unit_too_large",
        }
    }
}

/// Caps that hold whatever the budget: what one hostile file can make a binary allocate.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Function symbols per binary (its tables merged); past this, none are kept.
    pub max_symbols: usize,
    /// Bytes one compressed DWARF section may inflate to.
    pub max_decompressed: usize,
    /// Bytes `.gnu_debugdata` (symbol tables only; real ones are a few hundred KiB) may
    /// inflate to.
    pub max_mini_debug_info: usize,
    /// Bytes of line rows and scopes one DWARF unit may parse into, and that one binary's
    /// parsed units may hold together.
    pub max_unit_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_symbols: 1 << 19,
            max_decompressed: 256 << 20,
            max_mini_debug_info: 16 << 20,
            max_unit_bytes: 16 << 20,
        }
    }
}

/// What the budget holds now and what it refused so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetStats {
    pub limit: u64,
    pub used: u64,
    /// Indexed like [`Degraded::ALL`]; cumulative.
    pub degraded: [u64; Degraded::ALL.len()],
}

impl BudgetStats {
    pub fn degraded(&self, reason: Degraded) -> u64 {
        self.degraded[reason as usize]
    }
}

struct Inner {
    limit: usize,
    used: AtomicUsize,
    degraded: [AtomicU64; Degraded::ALL.len()],
    limits: Limits,
}

/// The shared budget; clones share it.
#[derive(Clone)]
pub struct SymbolBudget(Arc<Inner>);

impl SymbolBudget {
    pub fn new(limit: u64, limits: Limits) -> Self {
        Self(Arc::new(Inner {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            used: AtomicUsize::new(0),
            degraded: Default::default(),
            limits,
        }))
    }

    /// No shared limit, the default [`Limits`]: for tools and tests that load one file.
    pub fn unlimited() -> Self {
        Self::new(u64::MAX, Limits::default())
    }

    pub fn limits(&self) -> &Limits {
        &self.0.limits
    }

    /// Bytes that can still be charged.
    pub fn available(&self) -> usize {
        self.0
            .limit
            .saturating_sub(self.0.used.load(Ordering::Relaxed))
    }

    pub fn count(&self, reason: Degraded) {
        self.0.degraded[reason as usize].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(reason = reason.reason(), "symbol data degraded");
    }

    pub fn stats(&self) -> BudgetStats {
        BudgetStats {
            limit: self.0.limit as u64,
            used: self.0.used.load(Ordering::Relaxed) as u64,
            degraded: std::array::from_fn(|i| self.0.degraded[i].load(Ordering::Relaxed)),
        }
    }

    fn try_reserve(&self, bytes: usize) -> bool {
        self.0
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes)
                    .filter(|&total| total <= self.0.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.0.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Bytes one holder has charged to the budget; given back when it drops.
pub struct Charge {
    budget: SymbolBudget,
    bytes: Cell<usize>,
}

impl Charge {
    pub fn new(budget: &SymbolBudget) -> Self {
        Self {
            budget: budget.clone(),
            bytes: Cell::new(0),
        }
    }

    /// A charge of `bytes`, or `None` (counted as [`Degraded::Budget`]) when they do not fit.
    pub fn of(budget: &SymbolBudget, bytes: usize) -> Option<Self> {
        let charge = Self::new(budget);
        charge.try_grow(bytes).then_some(charge)
    }

    /// Adds `bytes` if the budget has room; false (nothing charged) otherwise.
    pub fn try_grow(&self, bytes: usize) -> bool {
        if !self.budget.try_reserve(bytes) {
            return false;
        }
        self.bytes.set(self.bytes.get() + bytes);
        true
    }

    /// Gives back up to `bytes` of this charge.
    pub fn shrink(&self, bytes: usize) {
        let bytes = bytes.min(self.bytes.get());
        self.bytes.set(self.bytes.get() - bytes);
        self.budget.release(bytes);
    }

    pub fn bytes(&self) -> usize {
        self.bytes.get()
    }

    pub fn budget(&self) -> &SymbolBudget {
        &self.budget
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.bytes.get());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_fit_the_limit_and_are_given_back_on_drop() {
        let budget = SymbolBudget::new(100, Limits::default());
        let a = Charge::of(&budget, 60).unwrap();
        assert!(Charge::of(&budget, 41).is_none(), "60 + 41 > 100");
        let b = Charge::new(&budget);
        assert!(b.try_grow(40));
        assert!(!b.try_grow(1));
        assert_eq!(budget.stats().used, 100);
        b.shrink(30);
        assert_eq!(budget.available(), 30);
        drop(a);
        drop(b);
        assert_eq!(budget.stats().used, 0);
    }

    #[test]
    fn reasons_are_counted_apart() {
        let budget = SymbolBudget::unlimited();
        budget.count(Degraded::TooManySymbols);
        budget.count(Degraded::TooManySymbols);
        budget.count(Degraded::Budget);
        let stats = budget.stats();
        assert_eq!(stats.degraded(Degraded::TooManySymbols), 2);
        assert_eq!(stats.degraded(Degraded::Budget), 1);
        assert_eq!(stats.degraded(Degraded::DwarfUnitTooLarge), 0);
    }
}
