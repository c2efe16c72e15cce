//! Model cards: the `README.md` every command that writes a model puts beside it, so the
//! Hugging Face Hub shows where the model came from and anyone can make it again.
//!
//! A card is Hub YAML front matter (`base_model`, `base_model_relation`, `tags`,
//! `library_name`) followed by Markdown: what was done, with which weights or schedule, the
//! command (or config) that reproduces it, and the tool's version. Each planner fills a
//! [`Card`]; the CLI only hands over what it alone knows (the command line as typed and the
//! output's name) in a [`CardRequest`].
//!
//! `base_model` lists only the inputs that name a Hub repo (`org/name`, `hf://…`, or a folder
//! of the local HF cache): the Hub refuses a README whose `base_model` holds anything else,
//! such as a local path. Every input, local or not, is listed in the body.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

use crate::source::{Reference, parse_reference};

/// The version the card names: this crate's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the caller knows about a run that the planner does not. A planner given `None`
/// writes no card (`--no-write-model-card`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CardRequest {
    /// The output's name (its folder's name), for the card's title.
    pub name: Option<String>,
    /// The command line as the user typed it, quoted for a POSIX shell (see
    /// [`command_line`]); shown so the model can be made again.
    pub command_line: Option<String>,
}

/// How the output relates to its Hub inputs, in the Hub's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    /// Several models blended into one.
    Merge,
    /// One model changed by training (a LoRA merged into its base is that fine-tune saved
    /// whole; `adapter` would tell the Hub the repo holds a PEFT adapter, which it does not).
    Finetune,
    /// The same weights, re-saved: no relation is claimed, the Hub infers one.
    Unstated,
}

impl Relation {
    fn hub_name(self) -> Option<&'static str> {
        match self {
            Relation::Merge => Some("merge"),
            Relation::Finetune => Some("finetune"),
            Relation::Unstated => None,
        }
    }
}

/// Everything a card says; [`Card::render`] writes it.
#[derive(Clone, Debug)]
pub struct Card {
    pub request: CardRequest,
    /// Every input (models and adapters) as the user named it, in order.
    pub inputs: Vec<String>,
    pub relation: Relation,
    pub tags: Vec<&'static str>,
    /// The opening paragraph: what this model is.
    pub summary: String,
    /// Further sections (Markdown, each starting with its `## ` heading).
    pub sections: Vec<String>,
    /// The config file that reproduces the run (name, text), shown before the command.
    pub config: Option<(String, String)>,
}

impl Card {
    /// `README.md` and its bytes, for [`OutputFiles::generated`](crate::plan::OutputFiles).
    pub fn file(&self) -> (String, Vec<u8>) {
        ("README.md".into(), self.render().into_bytes())
    }

    /// The README.md: front matter, then the body.
    pub fn render(&self) -> String {
        let mut s = front_matter(&self.inputs, self.relation, &self.tags);
        let title = self.request.name.as_deref().unwrap_or("Merged model");
        let _ = write!(s, "# {title}\n\n{}\n\n", self.summary.trim_end());
        for section in &self.sections {
            let _ = write!(s, "{}\n\n", section.trim_end());
        }
        s.push_str("## Reproduce\n\n");
        if let Some((name, text)) = &self.config {
            let _ = write!(s, "The configuration (`{name}`):\n\n");
            fenced(&mut s, "yaml", text);
        }
        if let Some(cmd) = &self.request.command_line {
            s.push_str("The command:\n\n");
            fenced(&mut s, "sh", cmd);
        }
        let _ = writeln!(
            s,
            "Made with mergestream {VERSION}; the same command on the same inputs writes the same bytes."
        );
        s
    }
}

/// A fenced block whose fence is longer than any backtick run in `text`, so a config holding
/// backticks (a Jinja chat template) cannot end it early.
fn fenced(s: &mut String, lang: &str, text: &str) {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest.max(2) + 1);
    let _ = write!(
        s,
        "{fence}{lang}\n{}\n{fence}\n\n",
        text.trim_end_matches('\n')
    );
}

/// `---`, the Hub metadata as YAML, `---`. Serialized by serde_yaml_ng, so any name is quoted
/// as YAML needs.
fn front_matter(inputs: &[String], relation: Relation, tags: &[&str]) -> String {
    let mut hub: Vec<String> = Vec::new();
    for i in inputs {
        if let Some(id) = hub_id(i)
            && !hub.contains(&id)
        {
            hub.push(id);
        }
    }
    let mut meta = serde_json::Map::new();
    if !hub.is_empty() {
        meta.insert("base_model".into(), json!(hub));
        // A relation without a base model means nothing to the Hub.
        if let Some(r) = relation.hub_name() {
            meta.insert("base_model_relation".into(), json!(r));
        }
    }
    meta.insert("library_name".into(), json!("transformers"));
    meta.insert("tags".into(), json!(tags));
    let yaml = serde_yaml_ng::to_string(&Value::Object(meta)).unwrap_or_default();
    format!("---\n{yaml}---\n")
}

/// The Hub repo a model reference names, without revision or subfolder: `org/name`,
/// `org/name@rev`, `hf://org/name/...`, or a snapshot folder of the HF cache
/// (`…/models--org--name/snapshots/<commit>/…`). `None` for anything else.
pub fn hub_id(reference: &str) -> Option<String> {
    // mergekit's `model+lora` names two references; each is listed on its own by the caller.
    match parse_reference(reference, |p| p.exists()) {
        Ok(Reference::Hub { repo, .. }) => Some(repo),
        Ok(Reference::Local(p)) => cached_repo(&p),
        _ => cached_repo(Path::new(reference)),
    }
}

/// `org/name` of a path inside the HF cache layout.
fn cached_repo(path: &Path) -> Option<String> {
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts.windows(2).find_map(|w| {
        let rest = w[0].strip_prefix("models--")?;
        if w[1] != "snapshots" {
            return None;
        }
        let (org, name) = rest.split_once("--")?;
        let id = format!("{org}/{name}");
        crate::source::validate_repo_id(&id).ok().map(|()| id)
    })
}

/// `mergestream` and the arguments after the program name, each quoted for a POSIX shell
/// when it needs it, so the line pastes back into a terminal. A URL's credentials and query
/// (a presigned URL's signature) are replaced by `…`: a card is published.
pub fn command_line(args: impl IntoIterator<Item = OsString>) -> String {
    let mut line = String::from("mergestream");
    for a in args {
        line.push(' ');
        line.push_str(&shell_quote(&redact_url(&a.to_string_lossy())));
    }
    line
}

fn redact_url(arg: &str) -> String {
    let lower = arg.get(..8).unwrap_or(arg).to_ascii_lowercase();
    let Some(scheme_len) = ["https://", "http://"]
        .iter()
        .find(|s| lower.starts_with(**s))
        .map(|s| s.len())
    else {
        return arg.to_string();
    };
    let (scheme, rest) = arg.split_at(scheme_len);
    let (rest, query) = match rest.split_once('?') {
        Some((r, _)) => (r, "?…"),
        None => (rest, ""),
    };
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = match host.rsplit_once('@') {
        Some((_, h)) => format!("…@{h}"),
        None => host.to_string(),
    };
    format!("{scheme}{host}{path}{query}")
}

fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./=:@+,%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// A ratio as the card prints it: up to four decimals, no trailing zeros.
pub fn ratio(r: f64) -> String {
    let s = format!("{r:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.to_string() }
}

/// A Markdown table of a per-tensor value grouped by layer (the first `.N.` of a name):
/// one row per layer with the range of its tensors' values, and one per tensor outside
/// layers, in the order given.
pub fn layer_table(heading: &str, values: &[(&str, f64)]) -> String {
    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    for &(name, v) in values {
        let key = match layer_of(name) {
            Some(n) => format!("layer {n}"),
            None => format!("`{name}`"),
        };
        match rows.iter_mut().find(|(k, _, _)| *k == key) {
            Some(row) => {
                row.1 = row.1.min(v);
                row.2 = row.2.max(v);
            }
            None => rows.push((key, v, v)),
        }
    }
    let mut s = format!("| tensors | {heading} |\n|---|---|\n");
    for (key, lo, hi) in rows {
        let range = if lo == hi {
            ratio(lo)
        } else {
            format!("{} – {}", ratio(lo), ratio(hi))
        };
        let _ = writeln!(s, "| {key} | {range} |");
    }
    s
}

fn layer_of(name: &str) -> Option<u64> {
    name.split('.').find_map(|p| p.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_what_the_shell_would_split_or_expand() {
        let line = command_line(
            [
                "blockmerge",
                "--gradient_values",
                "[0.9,0.0]",
                "it's",
                "a b",
                "",
            ]
            .map(OsString::from),
        );
        assert_eq!(
            line,
            r"mergestream blockmerge --gradient_values '[0.9,0.0]' 'it'\''s' 'a b' ''"
        );
    }

    #[test]
    fn urls_lose_credentials_and_queries() {
        assert_eq!(
            redact_url("https://u:p@host.example/a/b?X-Amz-Signature=s"),
            "https://…@host.example/a/b?…"
        );
        assert_eq!(redact_url("models/base"), "models/base");
    }

    #[test]
    fn hub_ids_from_references() {
        assert_eq!(hub_id("org/name@main").as_deref(), Some("org/name"));
        assert_eq!(hub_id("hf://org/name/sub").as_deref(), Some("org/name"));
        assert_eq!(
            hub_id("/c/hub/models--org--name/snapshots/abc").as_deref(),
            Some("org/name")
        );
        assert_eq!(hub_id("./local/model"), None);
        assert_eq!(hub_id("s3://bucket/model"), None);
    }

    #[test]
    fn front_matter_is_yaml_with_hub_keys() {
        let card = Card {
            request: CardRequest {
                name: Some("out".into()),
                command_line: Some("mergestream x".into()),
            },
            inputs: vec!["org/a".into(), "./local".into(), "org/b@v2".into()],
            relation: Relation::Merge,
            tags: vec!["merge", "mergestream"],
            summary: "s".into(),
            sections: vec![],
            config: None,
        };
        let text = card.render();
        let fm = text
            .strip_prefix("---\n")
            .and_then(|t| t.split_once("\n---\n"))
            .map(|(f, _)| f)
            .unwrap();
        let v: serde_json::Value = serde_yaml_ng::from_str(fm).unwrap();
        assert_eq!(v["base_model"], json!(["org/a", "org/b"]));
        assert_eq!(v["base_model_relation"], "merge");
        assert_eq!(v["library_name"], "transformers");
        assert!(text.contains("```sh\nmergestream x\n```"));
        assert!(text.contains(VERSION));
    }

    #[test]
    fn layer_table_groups_by_layer() {
        let t = layer_table(
            "share",
            &[
                ("model.layers.0.a", 0.9),
                ("model.layers.0.b", 0.85),
                ("model.norm.weight", 0.0),
            ],
        );
        assert!(t.contains("| layer 0 | 0.85 – 0.9 |"), "{t}");
        assert!(t.contains("| `model.norm.weight` | 0 |"), "{t}");
    }
}
