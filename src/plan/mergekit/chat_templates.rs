//! Chat templates by mergekit's names (`chat_template: chatml` …), each written so that it
//! renders exactly as mergekit 0.1.5's packaged template does under transformers' Jinja
//! settings (`trim_blocks`, `lstrip_blocks`) — whitespace quirks included, since the rendered
//! prompt is what the model sees. Checked against mergekit's renderings by
//! `tests/chat_templates.rs`.

/// The named templates mergekit ships.
pub const NAMED: [(&str, &str); 5] = [
    (
        "chatml",
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    ),
    (
        "llama3",
        "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    ),
    (
        "alpaca",
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}{% if system %}{{ (system | last).content | trim }}{% endif %}{{ '\\n\\n' }}{% for message in messages %}{% if message['role'] in ['user', 'assistant', 'user_context'] %}{% if message['role'] == 'user' %}{{ '### Instruction:\\n' }}{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' }}{% else %}{{ '### Input:\\n' }}{% endif %}{{ message['content'] | trim }}{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endif %}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}",
    ),
    (
        "mistral",
        "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}{{ bos_token }}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{% if loop.first and system_message is defined %}{{ ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}{% endif %}{% endfor %}",
    ),
    (
        "exaone",
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}{{ '    [|' + message['role'] + '|]' + message['content'] + '\\n' }}{% if message['role'] == 'user' %}{{ '        \\n\\n' }}{% else %}{{ '        [|endofturn|]\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif %}",
    ),
];

/// What `chat_template:` asks for, as mergekit reads it: a short single-line name of a
/// shipped template, `auto`, or Jinja text (at least 20 characters with a `{`).
#[derive(Debug, PartialEq)]
pub enum Requested<'a> {
    Named(&'static str),
    Auto,
    Text(&'a str),
}

/// Read the `chat_template:` value; `None` when it is none of the above (mergekit: "Invalid
/// chat template").
pub fn requested(value: &str) -> Option<Requested<'_>> {
    if value == "auto" {
        return Some(Requested::Auto);
    }
    if value.len() < 256
        && !value.contains('\n')
        && !value.contains('{')
        && let Some((_, t)) = NAMED.iter().find(|(n, _)| *n == value)
    {
        return Some(Requested::Named(t));
    }
    if value.len() < 20 || !value.contains('{') {
        return None;
    }
    Some(Requested::Text(value))
}

/// `auto`: the template most of the inputs have (each stripped of surrounding whitespace),
/// the first seen among equals, as mergekit's `Counter.most_common` picks it.
pub fn most_common<'a>(templates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for t in templates {
        let t = t.trim();
        if t.is_empty() {
            continue;
        }
        match counts.iter_mut().find(|(s, _)| s == t) {
            Some((_, c)) => *c += 1,
            None => counts.push((t.to_string(), 1)),
        }
    }
    let best = counts.iter().map(|(_, c)| *c).max()?;
    counts.into_iter().find(|(_, c)| *c == best).map(|(t, _)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_text_and_invalid_values() {
        assert_eq!(requested("chatml"), Some(Requested::Named(NAMED[0].1)));
        assert_eq!(requested("auto"), Some(Requested::Auto));
        assert_eq!(requested("vicuna"), None);
        assert_eq!(requested("{{ x }}"), None, "too short to be a template");
        let t = "{% for m in messages %}{{ m.content }}{% endfor %}";
        assert_eq!(requested(t), Some(Requested::Text(t)));
    }

    #[test]
    fn auto_takes_the_most_common_and_the_first_among_equals() {
        assert_eq!(most_common(["b", " a\n", "a", "b "]), Some("b".into()));
        assert_eq!(most_common(["x", "y"]), Some("x".into()));
        assert_eq!(most_common(["", "  "]), None);
    }
}
