//! A publishable key's origin allowlist. It binds browsers (which send `Origin` and cannot forge
//! it); a request without `Origin` comes from a non-browser client and is not judged by it.

/// Whether `origin` may use a key with this allowlist. Origins compare ASCII-case-insensitively,
/// as browsers serialise scheme and host in lower case; a trailing `/` in the list is ignored.
pub fn allowed(allowlist: &[String], origin: Option<&str>) -> bool {
    let Some(origin) = origin else { return true };
    allowlist.is_empty()
        || allowlist
            .iter()
            .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_table() {
        let list = vec![
            "https://app.example.com".to_owned(),
            "http://localhost:3000/".to_owned(),
        ];
        let cases: &[(&[String], Option<&str>, bool)] = &[
            (&[], Some("https://evil.example"), true),
            (&list, Some("https://app.example.com"), true),
            (&list, Some("https://APP.example.com"), true),
            (&list, Some("http://localhost:3000"), true),
            (&list, None, true),
            (&list, Some("https://evil.example"), false),
            (&list, Some("http://app.example.com"), false),
            (&list, Some("https://app.example.com.evil.example"), false),
            (&list, Some("null"), false),
        ];
        for (l, o, want) in cases {
            assert_eq!(allowed(l, *o), *want, "{l:?} {o:?}");
        }
    }
}
