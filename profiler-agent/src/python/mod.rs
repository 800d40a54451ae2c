//! CPython seen from outside the process: which processes run an interpreter and where its
//! runtime state is ([`detect`]), the layout of its structures per version ([`layout`]), and
//! the Python stack of each of its threads read from its memory, named from its code
//! objects ([`stack`]). Memory is read through [`remote::RemoteMemory`]
//! (`process_vm_readv`, or a test double); every read is bounded and every pointer checked,
//! since the process is not trusted.
//!
//! The kernel program walks the same frame chain at sample time with the offsets of
//! [`layout::Layout`] (see `profiler_common::PythonProcess`), and user space names each
//! recorded (code object, instruction) pair with [`stack::CodeNames`]. [`interpreters`]
//! ties the two together for one sampler.

pub mod detect;
pub mod interpreters;
pub mod layout;
pub mod remote;
pub mod stack;

pub use detect::{Interpreter, detect};
pub use interpreters::{Interpreters, PythonStats};
pub use layout::Layout;
