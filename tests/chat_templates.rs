//! Chat templates: ours render exactly as mergekit 0.1.5's packaged ones (renderings made by
//! `tests/fixtures/mergekit_extra/generate.sh` with jinja2 under transformers' settings), and
//! `chat_template:` writes `chat_template.jinja` as mergekit (through transformers 5) does.

use mergestream::plan::mergekit::chat_templates::NAMED;
use minijinja::{Environment, Error, ErrorKind, Value};

use crate::common::*;

/// Jinja as transformers renders chat templates (our templates have no whitespace outside
/// their tags, so transformers' `trim_blocks`/`lstrip_blocks` change nothing for them).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env
}

#[test]
fn named_templates_render_as_mergekits() {
    let cases: Vec<serde_json::Value> = serde_json::from_slice(
        &std::fs::read(fixtures().join("mergekit_extra/chat_templates.json")).unwrap(),
    )
    .unwrap();
    let env = environment();
    let mut checked = 0;
    for case in &cases {
        let name = case["template"].as_str().unwrap();
        let text = NAMED.iter().find(|(n, _)| *n == name).unwrap().1;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(&case["messages"]),
            add_generation_prompt => case["add_generation_prompt"].as_bool().unwrap(),
            bos_token => "<s>",
            eos_token => "</s>",
        };
        let got = env.render_str(text, ctx).ok();
        let want = case["rendered"].as_str().map(str::to_string);
        assert_eq!(got, want, "{name}: {}", case["messages"]);
        checked += 1;
    }
    assert_eq!(checked, 50);
}

fn merge_with(template: &str, extra: &[&str]) -> (tempfile::TempDir, std::process::Output) {
    let tmp = tempfile::tempdir().unwrap();
    let g = golden().join("models");
    let cfg = tmp.path().join("c.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5}}\nchat_template: {template}\ndtype: float16\n",
            g.join("base").display(),
            g.join("other").display()
        ),
    )
    .unwrap();
    let mut args = vec!["merge", "c.yml", "out", "--quiet"];
    args.extend_from_slice(extra);
    let o = mergestream(tmp.path(), &args);
    (tmp, o)
}

#[test]
fn a_named_template_is_written_as_chat_template_jinja() {
    let (tmp, o) = merge_with("llama3", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = tmp.path().join("out");
    let written = std::fs::read_to_string(out.join("chat_template.jinja")).unwrap();
    assert_eq!(written, NAMED[1].1);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(cfg.get("chat_template").is_none());
    // The tokenizer's other settings are copied unchanged.
    assert_eq!(
        std::fs::read(out.join("tokenizer_config.json")).unwrap(),
        std::fs::read(golden().join("models/base/tokenizer_config.json")).unwrap()
    );
}

#[test]
fn jinja_text_auto_and_no_tokenizer() {
    let text = "'{% for m in messages %}{{ m.content }}{% endfor %}'";
    let (tmp, o) = merge_with(text, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let written = std::fs::read_to_string(tmp.path().join("out/chat_template.jinja")).unwrap();
    assert_eq!(written, text.trim_matches('\''));
    // `auto` with no input template leaves the tokenizer as it is (mergekit does too).
    let (tmp, o) = merge_with("auto", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!tmp.path().join("out/chat_template.jinja").exists());
    // No tokenizer in the output: no template either.
    let (tmp, o) = merge_with("chatml", &["--no-copy-tokenizer"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!tmp.path().join("out/chat_template.jinja").exists());
}

#[test]
fn auto_picks_the_template_most_inputs_have() {
    let tmp = tempfile::tempdir().unwrap();
    // Three copies of the base model: two with template A (one as chat_template.jinja, one in
    // tokenizer_config.json), one with B.
    let a = "{% for m in messages %}A{{ m.content }}{% endfor %}";
    let b = "{% for m in messages %}B{{ m.content }}{% endfor %}";
    let mut paths = Vec::new();
    for (i, (tpl, as_file)) in [(b, false), (a, true), (a, false)].into_iter().enumerate() {
        let dir = tmp.path().join(format!("m{i}"));
        std::fs::create_dir(&dir).unwrap();
        for e in std::fs::read_dir(golden().join("models/base")).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
        if as_file {
            std::fs::write(dir.join("chat_template.jinja"), format!("{tpl}\n")).unwrap();
        } else {
            let mut cfg: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("tokenizer_config.json")).unwrap())
                    .unwrap();
            cfg["chat_template"] = tpl.into();
            std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        }
        paths.push(dir);
    }
    let models: String = paths
        .iter()
        .map(|p| {
            format!(
                "  - model: {}\n    parameters: {{weight: 1.0}}\n",
                p.display()
            )
        })
        .collect();
    std::fs::write(
        tmp.path().join("c.yml"),
        format!("merge_method: linear\nmodels:\n{models}chat_template: auto\ndtype: float16\n"),
    )
    .unwrap();
    ok(tmp.path(), &["merge", "c.yml", "out", "--quiet"]);
    let out = tmp.path().join("out");
    assert_eq!(
        std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(),
        a
    );
    // The donor's (first model's) tokenizer_config.json loses its B template.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(cfg.get("chat_template").is_none(), "{cfg}");
}

#[test]
fn an_unknown_template_name_is_an_error() {
    let (tmp, o) = merge_with("vicuna", &[]);
    assert_clean_failure(
        &o,
        &tmp.path().join("out"),
        &["invalid chat_template `vicuna`"],
    );
}
