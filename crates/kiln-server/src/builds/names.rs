//! Template names and tags as the SDK writes them: `alias`, `alias:tag` or
//! `namespace/alias:tag`.

use super::BuildServiceError;

/// `alias`, `alias:tag` or `namespace/alias:tag` → (alias, tags); the `default` tag is
/// implied, so it is left out.
pub fn parse_name(name: &str) -> Result<(String, Vec<String>), BuildServiceError> {
    let name = name.trim().to_ascii_lowercase();
    let (path, tag) = match name.rsplit_once(':') {
        Some((p, t)) => (p.to_string(), Some(t.to_string())),
        None => (name.clone(), None),
    };
    let alias = path.rsplit('/').next().unwrap_or("").to_string();
    let ok = |s: &str, extra: &[u8]| {
        !s.is_empty()
            && s.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b"-_".contains(&b)
                    || extra.contains(&b)
            })
    };
    if !ok(&alias, b"") || alias.len() > 64 || !alias.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(BuildServiceError::InvalidName { name });
    }
    let tags = match tag {
        Some(t) if !ok(&t, b".") => return Err(BuildServiceError::InvalidTag { tag: t }),
        Some(t) if t != "default" => vec![t],
        _ => vec![],
    };
    Ok((alias, tags))
}

/// A tag given on its own: 1-128 of a-z, 0-9, '-', '_' and '.'.
pub fn check_tag(tag: &str) -> Result<(), BuildServiceError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(BuildServiceError::InvalidTag {
            tag: tag.to_string(),
        })
    }
}

/// A build id that can name a file: build ids are UUIDs; records written by hand (and
/// older servers) may use other names of these characters.
pub fn is_build_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_name("my-tmpl").unwrap(), ("my-tmpl".into(), vec![]));
        assert_eq!(
            parse_name("Team/My_T:v1.2").unwrap(),
            ("my_t".into(), vec!["v1.2".into()])
        );
        assert_eq!(parse_name("a:default").unwrap(), ("a".into(), vec![]));
        assert!(parse_name("").is_err());
        assert!(parse_name("a b").is_err());
        assert!(parse_name("a:b/c").is_err());
    }

    #[test]
    fn build_ids_name_no_other_file() {
        assert!(is_build_id("0b7a3c2e-1f4d-4b8e-9a6f-2c1d0e9f8a7b"));
        assert!(is_build_id("cut-build"));
        for bad in ["", "../x", "a/b", ".hidden", &"a".repeat(65)] {
            assert!(!is_build_id(bad), "{bad}");
        }
    }
}
