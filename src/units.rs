//! Byte sizes as users write them: `2000MiB` (transformers), `5GB`, `5B` and `1.5K` (mergekit).

/// Parse a size in bytes.
///
/// - binary units: `KiB`, `MiB`, `GiB`, `TiB`;
/// - decimal units: `KB`, `MB`, `GB`, `TB`, and mergekit's bare `K`, `M`, `B` (billion), `G`, `T`;
/// - transformers' bit units `Kb`, `Mb`, `Gb` (divide by 8);
/// - a plain integer is bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let unit = unit.trim();
    if num.is_empty() {
        return Err(format!(
            "`{text}` is not a size (expected e.g. 2000MiB, 5GB, 5B)"
        ));
    }
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size (expected e.g. 2000MiB, 5GB, 5B)"))?;
    let (mult, bits) = match unit {
        "" => (1.0, false),
        "KiB" | "kiB" => (1024.0, false),
        "MiB" => (1024.0 * 1024.0, false),
        "GiB" => (1024.0f64.powi(3), false),
        "TiB" => (1024.0f64.powi(4), false),
        "KB" | "kB" | "K" | "k" => (1e3, false),
        "MB" | "M" | "m" => (1e6, false),
        "GB" | "G" | "g" | "B" | "b" => (1e9, false),
        "TB" | "T" | "t" => (1e12, false),
        "Kb" | "kb" => (1e3, true),
        "Mb" => (1e6, true),
        "Gb" => (1e9, true),
        _ => {
            return Err(format!(
                "`{text}` has an unknown unit `{unit}` (use KiB/MiB/GiB, KB/MB/GB, or K/M/B)"
            ));
        }
    };
    let bytes = value * mult / if bits { 8.0 } else { 1.0 };
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{text}` is not a usable size"));
    }
    Ok(bytes as u64)
}

/// A size as users write it, parsed by [`parse_size`] (so a command-line parser can check it
/// before anything is opened).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_size(s).map(ByteSize)
    }
}

/// Human-readable size for messages and the dry-run plan.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        assert_eq!(parse_size("2000MiB").unwrap(), 2000 * 1024 * 1024);
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("5B").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("100KB").unwrap(), 100_000);
        assert_eq!(parse_size("1.5K").unwrap(), 1500);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("8Gb").unwrap(), 1_000_000_000);
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn byte_size_from_str() {
        assert_eq!("2000MiB".parse::<ByteSize>().unwrap().bytes(), 2000 << 20);
        let e = "5Q".parse::<ByteSize>().unwrap_err();
        assert!(e.contains("unknown unit `Q`"), "{e}");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(10), "10 B");
        assert_eq!(human(1536), "1.50 KiB");
    }
}
