//! The tokenizer file parsers (tokenizer.json, tokenizer_config.json) on arbitrary bytes,
//! and what parses through add, strip and write.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mergestream::tokenizer::files::{AddedToken, parse_tokenizer_config, parse_tokenizer_json};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = parse_tokenizer_config(data) {
        let _ = c.to_bytes(&c.added_tokens_decoder);
    }
    if let Ok(mut t) = parse_tokenizer_json(data) {
        t.add_token(&AddedToken::plain("<fuzz>"));
        assert!(t.token_to_id("<fuzz>").is_some());
        let keep = data.len() % 16;
        if t.strip(keep).is_ok() {
            assert!(t.vocab().values().all(|&i| (i as usize) < keep));
        }
        let back = parse_tokenizer_json(&t.to_bytes()).expect("written tokenizer.json parses");
        assert_eq!(back.added, t.added);
    }
});
