//! What `record` writes: gzipped pprof, a flame graph SVG, folded stacks, or several of them.
//! Without `--format` the output's extension decides; with several formats each goes to the
//! output's name with its own extension.

use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::{profile, server::render_svg};

/// One kind of output file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Gzipped pprof (`go tool pprof`, Pyroscope, Grafana).
    Pprof,
    /// A flame graph, an SVG file for a browser.
    Svg,
    /// Folded stacks, one `root;...;leaf count` line per stack (flamegraph.pl, speedscope).
    Folded,
}

/// Extensions recognized on the output path, longest first.
const EXTENSIONS: [(&str, OutputFormat); 5] = [
    (".pb.gz", OutputFormat::Pprof),
    (".pb", OutputFormat::Pprof),
    (".svg", OutputFormat::Svg),
    (".folded", OutputFormat::Folded),
    (".txt", OutputFormat::Folded),
];

impl OutputFormat {
    /// The format an output path's extension names; pprof for any other.
    pub fn of_path(path: &Path) -> Self {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        EXTENSIONS
            .iter()
            .find(|(ext, _)| name.ends_with(ext))
            .map_or(OutputFormat::Pprof, |(_, format)| *format)
    }

    fn extension(self) -> &'static str {
        match self {
            OutputFormat::Pprof => ".pb.gz",
            OutputFormat::Svg => ".svg",
            OutputFormat::Folded => ".folded",
        }
    }
}

/// The files to write: each requested format (the extension's when none is) with its path:
/// `output` itself for the format its extension names, else `output` with that extension
/// replaced.
pub fn outputs(output: &Path, formats: &[OutputFormat]) -> Vec<(OutputFormat, PathBuf)> {
    let named = OutputFormat::of_path(output);
    let only = [named];
    let requested = if formats.is_empty() {
        &only[..]
    } else {
        formats
    };
    let mut wanted = Vec::new();
    for format in requested {
        if !wanted.contains(format) {
            wanted.push(*format);
        }
    }
    wanted
        .into_iter()
        .map(|format| {
            if format == named {
                return (format, output.to_owned());
            }
            let name = output
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let stem = EXTENSIONS
                .iter()
                .find_map(|(ext, _)| name.strip_suffix(ext))
                .unwrap_or(&name);
            (
                format,
                output.with_file_name(format!("{stem}{}", format.extension())),
            )
        })
        .collect()
}

/// Writes `built` in `format` to `file`.
pub fn write(
    format: OutputFormat,
    file: &mut File,
    built: &profile::BuiltProfile,
    title: &str,
) -> std::io::Result<()> {
    let bytes = match format {
        OutputFormat::Pprof => built.encode_gzip()?,
        OutputFormat::Svg => render_svg(title, &profile::folded(&built.profile))?,
        OutputFormat::Folded => {
            let mut text = String::new();
            for (stack, count) in profile::folded(&built.profile) {
                text.push_str(&format!("{stack} {count}\n"));
            }
            text.into_bytes()
        }
    };
    file.write_all(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(output: &str, formats: &[OutputFormat]) -> Vec<(OutputFormat, String)> {
        outputs(Path::new(output), formats)
            .into_iter()
            .map(|(f, p)| (f, p.display().to_string()))
            .collect()
    }

    #[test]
    fn the_extension_picks_the_format_and_others_replace_it() {
        use OutputFormat::*;
        assert_eq!(
            paths("profile.pb.gz", &[]),
            [(Pprof, "profile.pb.gz".into())]
        );
        assert_eq!(paths("out/flame.svg", &[]), [(Svg, "out/flame.svg".into())]);
        assert_eq!(paths("stacks.txt", &[]), [(Folded, "stacks.txt".into())]);
        assert_eq!(paths("anything", &[]), [(Pprof, "anything".into())]);
        assert_eq!(
            paths("profile.pb.gz", &[Svg, Pprof, Folded, Svg]),
            [
                (Svg, "profile.svg".into()),
                (Pprof, "profile.pb.gz".into()),
                (Folded, "profile.folded".into()),
            ]
        );
        assert_eq!(paths("run1.svg", &[Pprof]), [(Pprof, "run1.pb.gz".into())]);
        assert_eq!(paths("noext", &[Svg]), [(Svg, "noext.svg".into())]);
    }
}
