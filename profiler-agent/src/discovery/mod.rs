//! Where the label sets attached to profiles come from and how they are rewritten: providers
//! publish their full current targets on a watch channel (`docker`, `kubernetes`, `process`
//! scans, static targets from config), and `relabel` applies Prometheus relabel rules before
//! `crate::targets` resolves processes to them.

pub mod docker;
pub mod kubernetes;
pub mod manager;
pub mod process;
pub mod relabel;
