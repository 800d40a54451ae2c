//! Write path tests.
