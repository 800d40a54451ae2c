//! Reads `go tool pprof -raw`, the independent reader's view of a profile: each sample's
//! values, and each location's mapping id and its lines' function names in the order the
//! reader gives them (innermost inline level first, as pprof defines).

/// One location as `go tool pprof -raw` prints it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RawLocation {
    pub id: u64,
    /// 0 when the location has no mapping.
    pub mapping: u64,
    pub functions: Vec<String>,
}

/// Each sample's values, in the order of the `Samples` section, whose sample lines read
/// `VALUE...: LOCATION_ID...` (label lines under them, `key:[value]`, are not samples).
pub fn sample_values(raw: &str) -> Vec<Vec<i64>> {
    let Some((_, section)) = raw.split_once("Samples:") else {
        return Vec::new();
    };
    let section = section
        .split_once("\nLocations\n")
        .map_or(section, |(s, _)| s);
    section
        .lines()
        .filter_map(|line| {
            let (values, _) = line.split_once(':')?;
            let values: Vec<i64> = values
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            (!values.is_empty()).then_some(values)
        })
        .collect()
}

/// Every location of the `-raw` output, in its order. The format is
/// `    ID: 0xADDR M=MAPPING NAME FILE:LINE s=START`, then one line per further inline level
/// with only `NAME FILE:LINE s=START` (C names: no spaces).
pub fn locations(raw: &str) -> Vec<RawLocation> {
    let Some((_, section)) = raw.split_once("\nLocations\n") else {
        return Vec::new();
    };
    let section = section
        .split_once("\nMappings\n")
        .map_or(section, |(l, _)| l);
    let mut out: Vec<RawLocation> = Vec::new();
    for line in section.lines() {
        let mut words = line.split_whitespace().peekable();
        let Some(first) = words.peek().copied() else {
            continue;
        };
        if let Some(id) = first.strip_suffix(':').and_then(|n| n.parse().ok()) {
            words.next();
            words.next(); // the address
            let mut location = RawLocation {
                id,
                ..RawLocation::default()
            };
            if let Some(mapping) = words.peek().and_then(|w| w.strip_prefix("M=")) {
                location.mapping = mapping.parse().unwrap_or(0);
                words.next();
            }
            location.functions.extend(words.next().map(str::to_owned));
            out.push(location);
        } else if let Some(location) = out.last_mut() {
            location.functions.push(first.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_locations_with_inline_levels_and_mappings() {
        let raw = "PeriodType: cpu nanoseconds\nSamples:\nsamples/count cpu/nanoseconds\n\
                   3 30: 1 2\nLocations\n\
                   \x20    1: 0x1139 M=1 mix /src/inline.c:5 s=0\n\
                   \x20            scramble /src/inline.c:12 s=0\n\
                   \x20            hot_loop /src/inline.c:20 s=0\n\
                   \x20    2: 0x0 M=2 [unknown] :0 s=0\n\
                   \x20    3: 0x10 \n\
                   Mappings\n1: 0x1000/0x2000/0x0 /bin/x abc [FN]\n";
        assert_eq!(
            locations(raw),
            [
                RawLocation {
                    id: 1,
                    mapping: 1,
                    functions: vec!["mix".into(), "scramble".into(), "hot_loop".into()],
                },
                RawLocation {
                    id: 2,
                    mapping: 2,
                    functions: vec!["[unknown]".into()],
                },
                RawLocation {
                    id: 3,
                    mapping: 0,
                    functions: vec![],
                },
            ]
        );
        assert!(locations("no such section").is_empty());
        assert_eq!(sample_values(raw), [vec![3, 30]]);
        let labelled = "Samples:\nsamples/count[dflt] cpu/nanoseconds\n\
                        \x20         2   20: 1 2 \n\
                        \x20               comm:[spin]\n\
                        \x20               pid:[42]\n\
                        \x20         5   50: 3 \n\
                        Locations\n";
        assert_eq!(sample_values(labelled), [vec![2, 20], vec![5, 50]]);
        assert!(sample_values("no such section").is_empty());
    }
}
