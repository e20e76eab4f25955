//! A1111's extra-network prompt tags `<lora:NAME>` / `<lora:NAME:WEIGHT>`: found in the prompt
//! and removed from the text the text encoder reads (the infotext keeps them).

/// One `<lora:...>` tag.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub weight: f64,
}

/// Byte ranges and contents of the `<lora:...>` tags in `prompt`.
fn tag_spans(prompt: &str) -> Vec<(usize, usize, &str)> {
    const OPEN: &str = "<lora:";
    let mut spans = Vec::new();
    let mut from = 0;
    while let Some(start) = prompt[from..].find(OPEN).map(|i| from + i) {
        let body_start = start + OPEN.len();
        let Some(len) = prompt[body_start..].find('>') else {
            break;
        };
        let end = body_start + len + 1;
        spans.push((start, end, &prompt[body_start..end - 1]));
        from = end;
    }
    spans
}

/// The prompt's LoRA tags; a tag with an empty name, a weight that is not a number, or more
/// than one weight is an error.
pub fn lora_tags(prompt: &str) -> anyhow::Result<Vec<LoraTag>> {
    tag_spans(prompt)
        .into_iter()
        .map(|(start, _, body)| {
            let mut parts = body.split(':');
            let name = parts.next().unwrap_or("").trim();
            let weight = parts.next().map(str::trim);
            let column = prompt[..start].chars().count() + 1;
            anyhow::ensure!(
                !name.is_empty() && parts.next().is_none(),
                "LoRA tag <lora:{body}> at character {column}: write <lora:NAME> or <lora:NAME:WEIGHT>"
            );
            let weight = match weight {
                None => 1.0,
                Some(w) => w.parse::<f64>().ok().filter(|w| w.is_finite()).ok_or_else(|| {
                    anyhow::anyhow!(
                        "LoRA tag <lora:{body}> at character {column}: weight {w:?} is not a number"
                    )
                })?,
            };
            Ok(LoraTag {
                name: name.to_string(),
                weight,
            })
        })
        .collect()
}

/// `prompt` without its `<lora:...>` tags (what the text encoder reads).
pub fn strip_lora_tags(prompt: &str) -> String {
    let mut out = String::with_capacity(prompt.len());
    let mut from = 0;
    for (start, end, _) in tag_spans(prompt) {
        out.push_str(&prompt[from..start]);
        from = end;
    }
    out.push_str(&prompt[from..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_found_and_removed() {
        let prompt = "a cat <lora:style:0.7>, <lora:other> in a hat";
        let tags = lora_tags(prompt).unwrap();
        assert_eq!(
            tags,
            vec![
                LoraTag {
                    name: "style".into(),
                    weight: 0.7
                },
                LoraTag {
                    name: "other".into(),
                    weight: 1.0
                }
            ]
        );
        assert_eq!(strip_lora_tags(prompt), "a cat ,  in a hat");
        assert_eq!(strip_lora_tags("no tags <b>"), "no tags <b>");
    }

    #[test]
    fn malformed_tags_are_errors_with_their_position() {
        let err = lora_tags("ab <lora:x:heavy>").unwrap_err().to_string();
        assert!(
            err.contains("character 4") && err.contains("\"heavy\""),
            "{err}"
        );
        assert!(lora_tags("<lora::1>").is_err());
        assert!(lora_tags("<lora:x:1:2>").is_err());
    }
}
