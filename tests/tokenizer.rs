//! Prompt tokenizer: exact ids against transformers' `CLIPTokenizer` (tests/fixtures/cases/tokenizer.json)
//! through both loading paths (`tokenizer.json`, and `vocab.json` + `merges.txt`).

mod common;

use std::fs;
use std::path::Path;

use candle_core::Device;
use ldm::tokenizer::PromptTokenizer;
use serde_json::Value;

const SD1_PAD: u32 = 49407;
const SD2_PAD: u32 = 0;

fn tokenizer(dir: &Path) -> PromptTokenizer {
    PromptTokenizer::from_dir(dir).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
}

fn sd1_dir() -> std::path::PathBuf {
    common::fixture("tiny-sd1/tokenizer")
}

fn sd2_dir() -> std::path::PathBuf {
    common::fixture("tiny-sd2/tokenizer")
}

fn ids(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).unwrap()
}

/// Every recorded string encodes to transformers' ids, with its truncation state.
fn assert_matches_recorded(tokenizer: &PromptTokenizer, pipeline: &str) {
    let case = common::load_case_json("tokenizer");
    let rows = case["rows"].as_array().unwrap();
    assert!(rows.len() >= 10, "too few recorded rows: {}", rows.len());
    for row in rows {
        let text = row["text"].as_str().unwrap();
        let expected = ids(&row[format!("{pipeline}_input_ids")]);
        let untruncated = ids(&row[format!("{pipeline}_input_ids_untruncated")]).len();
        let got = tokenizer.encode(text).unwrap();
        assert_eq!(got.ids, expected, "{pipeline}: ids of {text:?}");
        assert_eq!(
            got.untruncated_len, untruncated,
            "{pipeline}: length of {text:?}"
        );
        assert_eq!(
            got.truncated,
            untruncated > 77,
            "{pipeline}: truncation of {text:?}"
        );
    }
    eprintln!("{pipeline}: {} recorded prompts match exactly", rows.len());
}

#[test]
fn sd1_vocab_merges_matches_transformers() {
    assert_matches_recorded(&tokenizer(&sd1_dir()), "sd1");
}

#[test]
fn sd2_tokenizer_json_matches_transformers() {
    assert_matches_recorded(&tokenizer(&sd2_dir()), "sd2");
}

/// SD 2.x hub repos ship vocab.json + merges.txt, with pad "!" only in special_tokens_map.json
/// (tokenizer_config.json still says `<|endoftext|>`); transformers lets the map win.
#[test]
fn sd2_vocab_merges_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["vocab.json", "merges.txt"] {
        fs::copy(sd1_dir().join(file), dir.path().join(file)).unwrap();
    }
    fs::copy(
        sd2_dir().join("special_tokens_map.json"),
        dir.path().join("special_tokens_map.json"),
    )
    .unwrap();
    let config = r#"{"model_max_length": 77, "pad_token": "<|endoftext|>"}"#;
    fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
    let tokenizer = tokenizer(dir.path());
    assert_eq!(tokenizer.pad_id(), SD2_PAD);
    assert_matches_recorded(&tokenizer, "sd2");
}

/// SD1's configs with a tokenizer.json: SD2's file without its "!" added token.
#[test]
fn sd1_tokenizer_json_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let mut json: Value =
        serde_json::from_str(&fs::read_to_string(sd2_dir().join("tokenizer.json")).unwrap())
            .unwrap();
    json["added_tokens"]
        .as_array_mut()
        .unwrap()
        .retain(|token| token["content"] != "!");
    fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        fs::copy(sd1_dir().join(file), dir.path().join(file)).unwrap();
    }
    assert_matches_recorded(&tokenizer(dir.path()), "sd1");
}

#[test]
fn special_ids_and_length_per_pipeline() {
    let case = common::load_case_json("tokenizer");
    for (dir, pad, pipeline) in [(sd1_dir(), SD1_PAD, "sd1"), (sd2_dir(), SD2_PAD, "sd2")] {
        let tokenizer = tokenizer(&dir);
        assert_eq!(tokenizer.max_length(), 77);
        assert_eq!(tokenizer.bos_id(), 49406);
        assert_eq!(tokenizer.eos_id(), 49407);
        assert_eq!(tokenizer.pad_id(), pad);
        assert_eq!(
            case["tokenizers"][pipeline]["pad_token_id"].as_u64(),
            Some(u64::from(pad))
        );
        let cat = tokenizer.encode("a photo of a cat").unwrap();
        assert_eq!(cat.ids[..7], [49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(cat.ids[7..].iter().all(|&id| id == pad));
        assert!(!cat.truncated);
        assert_eq!(cat.untruncated_len, 7);
    }
}

#[test]
fn long_prompt_keeps_bos_first_75_tokens_eos() {
    let tokenizer = tokenizer(&sd1_dir());
    let words = vec!["cat"; 100].join(" ");
    let encoded = tokenizer.encode(&words).unwrap();
    assert!(encoded.truncated);
    assert_eq!(encoded.untruncated_len, 102);
    assert_eq!(encoded.ids.len(), 77);
    assert_eq!(encoded.ids[0], 49406);
    assert!(encoded.ids[1..76].iter().all(|&id| id == 2368));
    assert_eq!(encoded.ids[76], 49407);

    // 75 tokens fill the context exactly: nothing is cut.
    let exact = tokenizer.encode(&vec!["cat"; 75].join(" ")).unwrap();
    assert!(!exact.truncated);
    assert_eq!(exact.untruncated_len, 77);
}

#[test]
fn batch_tensor_is_batch_by_max_length() {
    let tokenizer = tokenizer(&sd2_dir());
    let prompts = ["a photo of a cat", ""];
    let batch = tokenizer.encode_batch(&prompts, &Device::Cpu).unwrap();
    assert_eq!(batch.dims(), [2, 77]);
    let rows = batch.to_vec2::<u32>().unwrap();
    for (row, prompt) in rows.iter().zip(prompts) {
        assert_eq!(row, &tokenizer.encode(prompt).unwrap().ids);
    }
    assert_eq!(rows[1][..3], [49406, 49407, SD2_PAD]);
}

#[test]
fn decode_restores_words() {
    let tokenizer = tokenizer(&sd1_dir());
    let encoded = tokenizer.encode("A Photo of a CAT").unwrap();
    assert_eq!(tokenizer.decode(&encoded.ids).unwrap(), "a photo of a cat");
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = format!("{:#}", PromptTokenizer::from_dir(dir.path()).unwrap_err());
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert!(err.contains("tokenizer.json"), "{err}");

    fs::copy(sd1_dir().join("vocab.json"), dir.path().join("vocab.json")).unwrap();
    let err = format!("{:#}", PromptTokenizer::from_dir(dir.path()).unwrap_err());
    assert!(err.contains("merges.txt"), "{err}");

    let missing = dir.path().join("no-such-folder");
    let err = format!("{:#}", PromptTokenizer::from_dir(&missing).unwrap_err());
    assert!(err.contains("no-such-folder"), "{err}");
}
