//! Property tests of envd's parsers of client input: paths (`/files?path=`, RPC paths,
//! `cwd`), the Basic-auth user header, and `/files` signature parameters. None may
//! panic, and a resolved path is always absolute and clean. Tier: unprivileged.

use std::path::{Component, Path};

use axum::http::{HeaderMap, HeaderValue};
use kiln_envd::auth::{basic_auth_user, check_files_access, Operation, SignatureParams};
use kiln_envd::paths::resolve;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn resolved_paths_are_absolute_and_clean(
        path in "[~a-z./]{0,40}",
        workdir in proptest::option::of("[a-z/.]{0,20}"),
    ) {
        if let Ok(p) = resolve(&path, Path::new("/home/user"), workdir.as_deref()) {
            if p.is_absolute() {
                prop_assert!(p.components().all(|c| !matches!(c, Component::ParentDir | Component::CurDir)), "{p:?}");
            }
        }
    }

    #[test]
    fn any_path_text_resolves_or_fails_cleanly(path in ".{0,80}") {
        let _ = resolve(&path, Path::new("/home/user"), None);
    }

    #[test]
    fn any_authorization_header_parses_or_fails_cleanly(value in "[ -~]{0,80}") {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert("authorization", v);
        }
        let _ = basic_auth_user(&headers);
    }

    #[test]
    fn forged_signatures_never_pass(
        sig in "[ -~]{0,60}",
        exp in proptest::option::of("[-0-9a-z]{0,12}"),
        path in "[a-z/]{0,20}",
    ) {
        let params = SignatureParams {
            path: &path,
            username: "user",
            signature: Some(&sig),
            expiration: exp.as_deref(),
        };
        // A random string is not the SHA-256-based signature of the secret token.
        prop_assert!(check_files_access(Some("s3cret-token"), &HeaderMap::new(), Operation::Read, &params, 0).is_err());
    }
}
