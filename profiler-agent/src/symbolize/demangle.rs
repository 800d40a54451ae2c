//! Demangling modes of pyroscope.ebpf: `none` keeps the symbol, `full` keeps everything,
//! `templates` drops function parameters, `simplified` also drops template arguments. Rust
//! legacy and v0 symbols are demangled without their hash in every mode but `none`.
//!
//! Symbol names come from files a profiled process controls, so demangling has a budget: a
//! name longer than [`MAX_MANGLED`] is not parsed, the C++ parser and printer stop at
//! [`RECURSION_LIMIT`] levels, and output past [`MAX_DEMANGLED`] bytes (substitutions can
//! make it exponential in the input) is abandoned; in each case the mangled name is kept.

use std::{fmt::Write as _, str::FromStr};

/// Mangled names longer than this are kept as they are (real ones: a few hundred bytes,
/// rarely a few KiB for deep templates).
pub const MAX_MANGLED: usize = 8 << 10;
/// Demangled text longer than this is abandoned for the mangled name.
pub const MAX_DEMANGLED: usize = 64 << 10;
/// Nesting the C++ parser and printer follow (cpp_demangle's defaults are 96 and 128).
pub const RECURSION_LIMIT: u32 = 64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Demangle {
    None,
    #[default]
    Simplified,
    Templates,
    Full,
}

impl FromStr for Demangle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, false)
    }
}

impl Demangle {
    pub fn apply(self, symbol: &str) -> String {
        if self == Demangle::None || symbol.len() > MAX_MANGLED {
            return symbol.to_owned();
        }
        if let Ok(rust) = rustc_demangle::try_demangle(symbol) {
            // `{:#}` omits the hash suffix. rustc-demangle bounds its own recursion (and
            // output, at 1 MB); ours is tighter.
            let mut out = Capped::default();
            return match write!(out, "{rust:#}") {
                Ok(()) => out.text,
                Err(_) => symbol.to_owned(),
            };
        }
        let parse = cpp_demangle::ParseOptions::default().recursion_limit(RECURSION_LIMIT);
        let Ok(parsed) = cpp_demangle::Symbol::new_with_options(symbol, &parse) else {
            return symbol.to_owned();
        };
        let options = cpp_demangle::DemangleOptions::new().recursion_limit(RECURSION_LIMIT);
        let options = match self {
            Demangle::Full => options,
            _ => options.no_params().no_return_type(),
        };
        let mut out = Capped::default();
        if parsed.structured_demangle(&mut out, &options).is_err() {
            return symbol.to_owned();
        }
        let text = out.text;
        if self == Demangle::Simplified {
            strip_template_args(&text)
        } else {
            text
        }
    }
}

/// Text that refuses to grow past [`MAX_DEMANGLED`] bytes.
#[derive(Default)]
struct Capped {
    text: String,
}

impl std::fmt::Write for Capped {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.text.len() + s.len() > MAX_DEMANGLED {
            return Err(std::fmt::Error);
        }
        self.text.push_str(s);
        Ok(())
    }
}

/// Removes every balanced `<...>` group; `operator<`, `operator<<` and `operator->` keep
/// their angle brackets.
fn strip_template_args(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut depth = 0usize;
    for c in name.chars() {
        let in_operator_name = out.ends_with("operator") || out.ends_with("operator<");
        match c {
            '<' if depth == 0 && in_operator_name => out.push(c),
            '<' => depth += 1,
            '>' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPP: &str = "_ZN2ns6VectorIiE4pushERKi";
    const RUST_LEGACY: &str = "_ZN4core3fmt5write17h0123456789abcdefE";
    const RUST_V0: &str = "_RNvCs1234_7mycrate4main";

    #[test]
    fn modes_for_cpp() {
        assert_eq!(Demangle::None.apply(CPP), CPP);
        assert_eq!(
            Demangle::Full.apply(CPP),
            "ns::Vector<int>::push(int const&)"
        );
        assert_eq!(Demangle::Templates.apply(CPP), "ns::Vector<int>::push");
        assert_eq!(Demangle::Simplified.apply(CPP), "ns::Vector::push");
    }

    #[test]
    fn rust_symbols_lose_their_hash() {
        assert_eq!(Demangle::Simplified.apply(RUST_LEGACY), "core::fmt::write");
        assert_eq!(Demangle::Full.apply(RUST_LEGACY), "core::fmt::write");
        assert_eq!(Demangle::Full.apply(RUST_V0), "mycrate::main");
    }

    #[test]
    fn plain_c_names_pass_through() {
        for mode in [Demangle::None, Demangle::Simplified, Demangle::Full] {
            assert_eq!(mode.apply("chain_d"), "chain_d");
        }
    }

    /// Deep nesting: the parser's recursion limit refuses it quickly.
    #[test]
    fn deeply_nested_names_fall_back_quickly() {
        // f<A<A<A<...>>>>: one template level per `1AI`, well past RECURSION_LIMIT.
        let depth = 2000;
        let nested = format!("_Z1fI{}iEEvv", "1AI".repeat(depth) + &"E".repeat(depth));
        // Many levels of pointer-to-pointer-to-... types.
        let pointers = format!("_Z1fP{}i", "P".repeat(5000));
        for name in [nested, pointers] {
            assert!(name.len() < MAX_MANGLED, "tested within the length cap");
            let started = std::time::Instant::now();
            for mode in [Demangle::Full, Demangle::Simplified] {
                assert_eq!(mode.apply(&name), name);
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(1));
        }
        // Within the limit, nesting still demangles.
        assert_eq!(
            Demangle::Templates.apply("_Z1fI1AI1AIiEEEvv"),
            "f<A<A<int> > >"
        );
    }

    /// `f<A<int, int>, A<S1_, S1_>, A<S2_, S2_>, ...>`: each template argument names the
    /// previous one twice by substitution, so `levels` arguments demangle to about
    /// 2^levels times the text.
    fn doubling(levels: usize) -> String {
        let code =
            |index: usize| format!("S{}_", std::char::from_digit(index as u32 - 1, 36).unwrap());
        let mut name = String::from("_Z1fI1AIiiE");
        // Substitution 0 is f, 1 is A, 2 is A<int, int>; each argument adds the next.
        for previous in 2..2 + levels {
            name.push_str(&format!("S0_I{}{}E", code(previous), code(previous)));
        }
        name + "Evv"
    }

    /// Substitutions repeat earlier components: output grows exponentially with the
    /// input, and past MAX_DEMANGLED the mangled name is kept.
    #[test]
    fn exponential_output_is_cut_off() {
        let small = Demangle::Full.apply(&doubling(3));
        assert!(
            small.starts_with("void f<A<int, int>, A<A<int, int>, A<int, int> >"),
            "{small}"
        );
        // 2^30 times: gigabytes of text without the cap.
        let name = doubling(30);
        assert!(name.len() < 400);
        let started = std::time::Instant::now();
        assert_eq!(Demangle::Full.apply(&name), name);
        assert_eq!(Demangle::Simplified.apply(&name), name);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let long = "_Z".to_owned() + &"a".repeat(MAX_MANGLED);
        assert_eq!(Demangle::Full.apply(&long), long);
    }

    #[test]
    fn operator_less_survives_simplification() {
        assert_eq!(strip_template_args("std::operator<<"), "std::operator<<");
        assert_eq!(strip_template_args("a::operator<"), "a::operator<");
        assert_eq!(strip_template_args("it<T>::operator->"), "it::operator->");
        assert_eq!(strip_template_args("f<g<int>>::h"), "f::h");
    }
}
