use std::borrow::Cow;

use super::*;

fn builtin(names: &[&str]) -> Masker {
    let specs: Vec<DetectorSpec> = names
        .iter()
        .map(|n| DetectorSpec::Builtin(n.to_string()))
        .collect();
    Masker::new(&[], &specs).expect("builtin masker")
}

fn masked(m: &Masker, text: &str) -> String {
    m.mask_text(text).0.into_owned()
}

fn count(m: &Masker, text: &str) -> u32 {
    m.mask_text(text).1
}

/// Asserts that `m` leaves `text` alone, without allocating.
fn untouched(m: &Masker, text: &str) {
    let (out, n) = m.mask_text(text);
    assert!(
        matches!(out, Cow::Borrowed(_)),
        "{text:?} was masked as {out:?}"
    );
    assert_eq!(n, 0, "{text:?}");
}

/// `prefix` followed by the digit that makes it Luhn-valid.
fn with_luhn_digit(prefix: &str) -> String {
    (0..10)
        .map(|d| format!("{prefix}{d}"))
        .find(|s| check::luhn(s.as_bytes()))
        .unwrap()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---- card ----

#[test]
fn card_true_positives() {
    let m = builtin(&["card"]);
    let nineteen = with_luhn_digit("601100099013942400");
    assert_eq!(nineteen.len(), 19);
    for (text, want) in [
        ("4111111111111111", "************1111"),
        ("4111 1111 1111 1111", "**** **** **** 1111"),
        ("4111-1111-1111-1111", "****-****-****-1111"),
        ("5555555555554444", "************4444"),
        ("3782 822463 10005", "**** ****** *0005"), // Amex 4-6-5
        ("378282246310005", "***********0005"),
        ("6011111111111117", "************1117"),
        ("3530111333300000", "************0000"), // JCB
        ("30569309025904", "**********5904"),     // Diners, 14 digits
        ("4222222222222", "*********2222"),       // Visa, 13 digits
    ] {
        assert_eq!(masked(&m, text), want, "{text}");
    }
    assert_eq!(
        masked(&m, &nineteen),
        format!("{}{}", "*".repeat(15), &nineteen[15..])
    );
    assert_eq!(
        masked(&m, "card: 4111 1111 1111 1111, exp 12/29."),
        "card: **** **** **** 1111, exp 12/29."
    );
}

#[test]
fn card_followed_by_more_groups_is_cut_to_the_card() {
    let m = builtin(&["card"]);
    assert_eq!(
        masked(&m, "4111 1111 1111 1111 2029 ok"),
        "**** **** **** 1111 2029 ok"
    );
    // The candidate that starts one group early fails; the card after it is
    // still found.
    assert_eq!(
        masked(&m, "ref 2029 4111 1111 1111 1111"),
        "ref 2029 **** **** **** 1111"
    );
}

#[test]
fn card_true_negatives() {
    let m = builtin(&["card"]);
    for text in [
        "4111111111111112",       // Luhn-invalid
        "4111 1111 1111 1112",    // Luhn-invalid, grouped
        "order 9876543210123452", // first digit 9
        "id 1234567890123452",    // first digit 1
        "0000000000000000",       // all zeros (Luhn-valid)
        "4444444444444444",       // all one digit
        "411111111111",           // 12 digits
        "41111111111111111111",   // 20 digits
        "4111 1111-1111 1111",    // mixed separators
        "3.4111111111111111",     // a decimal
        "2024-4111111111111111",  // a dashed id
        "x4111111111111111",      // inside a word
        "2024-01-15 12:30:00",
    ] {
        untouched(&m, text);
    }
}

// ---- ssn ----

#[test]
fn ssn_true_positives() {
    let m = builtin(&["ssn"]);
    assert_eq!(masked(&m, "123-45-6789"), "***-**-****");
    assert_eq!(masked(&m, "SSN 123 45 6789."), "SSN *** ** ****.");
    assert_eq!(masked(&m, "(ssn: 555-12-3456)"), "(ssn: ***-**-****)");
}

#[test]
fn ssn_true_negatives() {
    let m = builtin(&["ssn"]);
    for text in [
        "000-12-3456",
        "666-12-3456",
        "912-34-5678",
        "123-00-4567",
        "123-45-0000",
        "078-05-1120",
        "123456789",        // bare digits: never an SSN
        "123-45-67890",     // longer
        "2024-123-45-6789", // part of a dashed id
        "123-45 6789",      // mixed separators
        "2024-01-15",
    ] {
        untouched(&m, text);
    }
}

// ---- email ----

#[test]
fn email_true_positives() {
    let m = builtin(&["email"]);
    assert_eq!(masked(&m, "ada@example.com"), "a***@example.com");
    assert_eq!(
        masked(&m, "Write to <Ada.Lovelace+work@mail.example.co.uk>."),
        "Write to <A***@mail.example.co.uk>."
    );
    assert_eq!(masked(&m, "mailto:jo@x.io"), "mailto:***@x.io");
    assert_eq!(
        masked(&m, "\"first_last@sub-domain.example.org\""),
        "\"f***@sub-domain.example.org\""
    );
}

#[test]
fn email_true_negatives() {
    let m = builtin(&["email"]);
    for text in [
        "@handle",
        "user@localhost",
        "a@b",
        "price 5@10.00",
        "x@example.c",
    ] {
        untouched(&m, text);
    }
}

// ---- phone ----

#[test]
fn phone_true_positives() {
    let m = builtin(&["phone"]);
    for (text, want) in [
        ("+1 (555) 123-4567", "+* (***) ***-****"),
        ("+44 20 7946 0958", "+** ** **** ****"),
        ("+4915112345678", "+*************"),
        ("+33 6 12 34 56 78", "+** * ** ** ** **"),
        ("+49 (0)30 1234567", "+** (*)** *******"),
        ("(415) 555-2671", "(***) ***-****"),
        ("415-555-2671", "***-***-****"),
        ("415.555.2671", "***.***.****"),
        ("415 555 2671", "*** *** ****"),
        ("1-800-555-0199", "*-***-***-****"),
    ] {
        assert_eq!(masked(&m, text), want, "{text}");
    }
    assert_eq!(
        masked(&m, "call 415-555-2671 today"),
        "call ***-***-**** today"
    );
}

#[test]
fn phone_true_negatives() {
    let m = builtin(&["phone"]);
    for text in [
        "2024-01-15",
        "123-456-7890",     // area code cannot start with 1
        "415-055-2671",     // nor the exchange with 0
        "415-555.2671",     // mixed separators
        "order 4155552671", // bare digits
        "10.200.300.4000",  // dotted numbers
        "score +12",
        "+1234567", // 7 digits
        "v1.2.3",
        "12:30:45",
        "x+4915112345678", // glued to a word
    ] {
        untouched(&m, text);
    }
}

// ---- iban ----

#[test]
fn iban_true_positives() {
    let m = builtin(&["iban"]);
    for (text, want) in [
        ("DE89 3704 0044 0532 0130 00", "DE** **** **** **** **** **"),
        ("DE89370400440532013000", "DE********************"),
        ("GB82 WEST 1234 5698 7654 32", "GB** **** **** **** **** **"),
        ("NL91ABNA0417164300", "NL****************"),
        (
            "FR14 2004 1010 0505 0001 3M02 606",
            "FR** **** **** **** **** **** ***",
        ),
        ("BE68539007547034", "BE**************"),
    ] {
        assert_eq!(masked(&m, text), want, "{text}");
    }
    // A full last group followed by another word of 4 is cut at the length
    // of the country.
    assert_eq!(
        masked(&m, "IBAN BE68 5390 0754 7034 ABCD."),
        "IBAN BE** **** **** **** ABCD."
    );
}

#[test]
fn iban_true_negatives() {
    let m = builtin(&["iban"]);
    for text in [
        "DE89 3704 0044 0532 0130 01", // check digits wrong
        "DE88370400440532013000",      // check digits wrong
        "XX89370400440532013000",      // no such country
        "DE8937040044053201300",       // too short for DE
        "DE893704004405320130000",     // too long for DE
        "ABCD1234EFGH5678IJKL",
    ] {
        untouched(&m, text);
    }
}

// ---- secrets ----

const JWT_SAMPLE: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";

#[test]
fn aws_key_true_positives() {
    let m = builtin(&["aws_key"]);
    assert_eq!(masked(&m, "AKIAIOSFODNN7EXAMPLE"), "[REDACTED:aws_key]");
    assert_eq!(
        masked(&m, "key=ASIAY34FZKBOKMUTVV7A;"),
        "key=[REDACTED:aws_key];"
    );
    assert_eq!(
        masked(&m, "s3://bucket/AKIAIOSFODNN7EXAMPLE/x"),
        "s3://bucket/[REDACTED:aws_key]/x"
    );
    assert_eq!(
        masked(
            &m,
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
        ),
        "aws_secret_access_key = [REDACTED:aws_key]\n"
    );
    assert_eq!(
        masked(
            &m,
            r#"{"SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}"#
        ),
        r#"{"SecretAccessKey": "[REDACTED:aws_key]"}"#
    );
}

#[test]
fn aws_key_true_negatives() {
    let m = builtin(&["aws_key"]);
    for text in [
        "AKIAIOSFODNN7EXAMPL",   // 15 after the prefix
        "XAKIAIOSFODNN7EXAMPLE", // inside a word
        "AKIAIOSFODNN7EXAMPLEX", // longer
        "secret_access_key = short",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", // 40 chars with no name
    ] {
        untouched(&m, text);
    }
}

#[test]
fn jwt_true_positives_and_negatives() {
    let m = builtin(&["jwt"]);
    assert_eq!(masked(&m, JWT_SAMPLE), "[REDACTED:jwt]");
    assert_eq!(
        masked(&m, &format!("token: {JWT_SAMPLE}, next")),
        "token: [REDACTED:jwt], next"
    );
    // alg "none": an empty signature.
    let unsigned = "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.";
    assert_eq!(masked(&m, unsigned), "[REDACTED:jwt]");
    for text in [
        "eyJfoo.eyJbar.baz",               // header is not JSON with alg
        "eyJhbGciOiJIUzI1NiJ9.notjwt.sig", // payload is not JSON
        "abc.def.ghi",
    ] {
        untouched(&m, text);
    }
}

#[test]
fn private_key_true_positives_and_negatives() {
    let m = builtin(&["private_key"]);
    let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo\n4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onL\n-----END RSA PRIVATE KEY-----";
    assert_eq!(
        masked(&m, &format!("key:\n{pem}\nbye")),
        "key:\n[REDACTED:private_key]\nbye"
    );
    let openssh = "-----BEGIN OPENSSH PRIVATE KEY-----\r\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=\r\n-----END OPENSSH PRIVATE KEY-----";
    assert_eq!(masked(&m, openssh), "[REDACTED:private_key]");
    let json = r#"{"private_key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----\n"}"#;
    assert_eq!(
        masked(&m, json),
        r#"{"private_key": "[REDACTED:private_key]\n"}"#
    );
    // Cut off before its END line: masked to the end of its base64 lines.
    let truncated =
        "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yRxRWbs\nMHcCAQEEIBkg4LVWM9nuw";
    assert_eq!(masked(&m, truncated), "[REDACTED:private_key]");
    let then_prose = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\nthat is all I have.";
    assert_eq!(
        masked(&m, then_prose),
        "[REDACTED:private_key]\nthat is all I have."
    );
    for text in [
        "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A\n-----END PUBLIC KEY-----",
        "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkq\n-----END CERTIFICATE-----",
        "private key rotation is due",
    ] {
        untouched(&m, text);
    }
}

#[test]
fn api_key_true_positives() {
    let m = builtin(&["api_key"]);
    for text in [
        "sk-proj-Ab12Cd34Ef56Gh78Ij90KlMnOpQrStUv",
        "sk-ant-api03-Ab12Cd34Ef56Gh78Ij90KlMnOpQrSt_Uv-wx",
        "sk-Ab12Cd34Ef56Gh78Ij90KlMnOpQrStUvWxYz0123456789ab",
        "ghp_0123456789abcdefghijABCDEFGHIJ012345",
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
        "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
        "AIzaSyA-1234567890abcdefghijklmnopqrstu",
        "glpat-Ab12Cd34Ef56Gh78Ij90",
        "npm_0123456789abcdefghijABCDEFGHIJ012345",
        "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
        "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",
    ] {
        assert_eq!(masked(&m, text), "[REDACTED:api_key]", "{text}");
        assert_eq!(
            masked(&m, &format!("Authorization: {text}\n")),
            "Authorization: [REDACTED:api_key]\n",
            "{text}"
        );
    }
}

#[test]
fn api_key_true_negatives() {
    let m = builtin(&["api_key"]);
    for text in [
        "sk-learn",
        "task-1234567890abcdefghijKLMN",        // `sk-` inside a word
        "sk-this-is-a-very-long-branch-name-2", // a slug
        "sk-abcdefghijklmnopqrstuvwxyz",        // no digit
        "ghp_short",
        "xoxb-abcdefghijklmnop", // Slack token without a digit
        "hf_model_name",
    ] {
        untouched(&m, text);
    }
}

#[test]
fn url_password_and_bearer_token() {
    let m = builtin(&["url_password", "bearer_token"]);
    assert_eq!(
        masked(
            &m,
            "DATABASE_URL=postgres://app:s3cr3t!@db.internal:5432/app"
        ),
        "DATABASE_URL=postgres://app:[REDACTED:url_password]@db.internal:5432/app"
    );
    assert_eq!(
        masked(&m, "Authorization: Bearer abcDEF123456ghiJKL789"),
        "Authorization: Bearer [REDACTED:bearer_token]"
    );
    for text in [
        "https://example.com/a:b",
        "https://user@example.com/",
        "the bearer of this letter",
        "Bearer abcdefghijklmnopqrstuvwxyz", // no digit
    ] {
        untouched(&m, text);
    }
}

#[test]
fn shortest_findings_are_scanned() {
    // Texts shorter than a masker's shortest possible finding are skipped
    // unread; these are at (or near) each built-in's shortest.
    let m = builtin(builtin_detector_names());
    for (text, want) in [
        ("a@b.co", "***@b.co"),
        ("+12025550", "+********"),
        ("NO9386011117947", "NO*************"),
        ("4222222222222", "*********2222"),
    ] {
        assert_eq!(masked(&m, text), want, "{text}");
    }
    let custom = Masker::new(
        &[],
        &[DetectorSpec::Custom {
            name: "x".into(),
            pattern: "x".into(),
            checksum: None,
        }],
    )
    .unwrap();
    assert_eq!(masked(&custom, "x"), "[REDACTED:x]");
}

// ---- custom detectors ----

#[test]
fn custom_detector_with_pattern() {
    let spec = DetectorSpec::Custom {
        name: "employee_id".into(),
        pattern: r"\bEMP-[0-9]{6}\b".into(),
        checksum: None,
    };
    let m = Masker::new(&[], &[spec]).unwrap();
    assert_eq!(
        masked(&m, "EMP-123456 and EMP-654321, not EMP-12345"),
        "[REDACTED:employee_id] and [REDACTED:employee_id], not EMP-12345"
    );
    assert_eq!(count(&m, "EMP-123456 and EMP-654321"), 2);
}

#[test]
fn custom_detector_with_checksum() {
    let luhn = DetectorSpec::Custom {
        name: "loyalty".into(),
        pattern: r"(?-u:\b)L[0-9]{10}(?-u:\b)".into(),
        checksum: Some(Checksum::Luhn),
    };
    let m = Masker::new(&[], &[luhn]).unwrap();
    let valid = format!("L{}", with_luhn_digit("123456789"));
    let mut invalid = valid.clone();
    let last = invalid.pop().unwrap();
    invalid.push(if last == '9' {
        '0'
    } else {
        (last as u8 + 1) as char
    });
    assert_eq!(masked(&m, &valid), "[REDACTED:loyalty]");
    untouched(&m, &invalid);

    let mod97 = DetectorSpec::Custom {
        name: "acct".into(),
        pattern: r"acct=(?P<value>[A-Z0-9]{18})".into(),
        checksum: Some(Checksum::Mod97),
    };
    let m = Masker::new(&[], &[mod97]).unwrap();
    assert_eq!(
        masked(&m, "acct=NL91ABNA0417164300;"),
        "acct=[REDACTED:acct];"
    );
    untouched(&m, "acct=NL91ABNA0417164301;");
}

#[test]
fn custom_detector_value_group_masks_only_the_value() {
    let spec = DetectorSpec::Custom {
        name: "password".into(),
        pattern: r"(?i)password\s*[:=]\s*(?P<value>\S+)".into(),
        checksum: None,
    };
    let m = Masker::new(&[], &[spec]).unwrap();
    assert_eq!(
        masked(&m, "user=bob Password: hunter2 ok"),
        "user=bob Password: [REDACTED:password] ok"
    );
}

#[test]
fn custom_detector_errors() {
    let bad = DetectorSpec::Custom {
        name: "x".into(),
        pattern: "(unclosed".into(),
        checksum: None,
    };
    let err = Masker::new(&[], &[bad]).unwrap_err().to_string();
    assert!(err.contains("detector `x`"), "{err}");
    assert!(err.contains("Rust regex syntax"), "{err}");
    assert!(err.contains("look-around"), "{err}");

    let lookaround = DetectorSpec::Custom {
        name: "y".into(),
        pattern: "foo(?=bar)".into(),
        checksum: None,
    };
    assert!(matches!(
        Masker::new(&[], &[lookaround]),
        Err(MaskError::BadPattern { .. })
    ));

    let empty = DetectorSpec::Custom {
        name: "z".into(),
        pattern: "a*".into(),
        checksum: None,
    };
    let err = Masker::new(&[], &[empty]).unwrap_err();
    assert!(matches!(err, MaskError::EmptyPattern { .. }), "{err}");

    let bad_name = DetectorSpec::Custom {
        name: "has space".into(),
        pattern: "a".into(),
        checksum: None,
    };
    assert!(matches!(
        Masker::new(&[], &[bad_name]),
        Err(MaskError::BadName(_))
    ));
}

#[test]
fn checksum_names() {
    assert_eq!("luhn".parse::<Checksum>().unwrap(), Checksum::Luhn);
    assert_eq!("MOD97".parse::<Checksum>().unwrap(), Checksum::Mod97);
    let err = "crc32".parse::<Checksum>().unwrap_err().to_string();
    assert_eq!(
        err,
        "unknown checksum `crc32`: valid checksums are luhn, mod97"
    );
    assert_eq!(Checksum::Mod97.to_string(), "mod97");
    assert!(Checksum::Luhn.verify("4111 1111 1111 1111"));
    assert!(!Checksum::Luhn.verify("0"));
    assert!(Checksum::Mod97.verify("GB82 WEST 1234 5698 7654 32"));
    assert!(!Checksum::Mod97.verify("GB82 WEST 1234 5698 7654 33"));
}

// ---- names, presets, resolve ----

#[test]
fn builtin_names_and_presets() {
    let names = builtin_detector_names();
    for name in [
        "card",
        "ssn",
        "email",
        "phone",
        "iban",
        "aws_key",
        "jwt",
        "private_key",
        "api_key",
    ] {
        assert!(names.contains(&name), "{name}");
    }
    let presets = builtin_presets();
    let get = |p: &str| presets.iter().find(|(n, _)| *n == p).unwrap().1;
    assert_eq!(get("contact"), ["email", "phone"]);
    assert_eq!(get("personal"), ["ssn", "email", "phone"]);
    assert_eq!(get("payment"), ["card", "iban"]);
    assert_eq!(get("secrets"), ["aws_key", "jwt", "private_key", "api_key"]);
    assert_eq!(get("all"), names);
    // Every built-in compiles and can be put in one masker.
    let m = builtin(names);
    assert!(m.has_detectors());
}

#[test]
fn resolve_expands_presets() {
    let custom = vec![("employee_id".to_string(), r"EMP-[0-9]{6}".to_string(), None)];
    let presets = vec![
        ("hr".to_string(), strings(&["personal", "employee_id"])),
        (
            "everything_hr".to_string(),
            strings(&["hr", "payment", "email"]),
        ),
    ];
    let specs = resolve(&strings(&["everything_hr", "jwt"]), &custom, &presets).unwrap();
    let names: Vec<&str> = specs.iter().map(DetectorSpec::name).collect();
    assert_eq!(
        names,
        [
            "ssn",
            "email",
            "phone",
            "employee_id",
            "card",
            "iban",
            "jwt"
        ]
    );
    assert_eq!(
        specs[3],
        DetectorSpec::Custom {
            name: "employee_id".into(),
            pattern: "EMP-[0-9]{6}".into(),
            checksum: None
        }
    );
    let all = resolve(&strings(&["all"]), &[], &[]).unwrap();
    assert_eq!(all.len(), builtin_detector_names().len());
}

#[test]
fn resolve_detects_cycles() {
    let presets = vec![
        ("a".to_string(), strings(&["email", "b"])),
        ("b".to_string(), strings(&["c"])),
        ("c".to_string(), strings(&["a"])),
    ];
    let err = resolve(&strings(&["a"]), &[], &presets).unwrap_err();
    assert!(matches!(err, MaskError::PresetCycle(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "presets include each other: a -> b -> c -> a"
    );

    let selfish = vec![("me".to_string(), strings(&["me"]))];
    let err = resolve(&strings(&["me"]), &[], &selfish).unwrap_err();
    assert_eq!(err.to_string(), "presets include each other: me -> me");

    // A preset named twice without a cycle is fine (a diamond).
    let diamond = vec![
        ("top".to_string(), strings(&["left", "right"])),
        ("left".to_string(), strings(&["base"])),
        ("right".to_string(), strings(&["base"])),
        ("base".to_string(), strings(&["card"])),
    ];
    let specs = resolve(&strings(&["top"]), &[], &diamond).unwrap();
    assert_eq!(specs, [DetectorSpec::Builtin("card".into())]);
}

#[test]
fn unknown_names_error_text() {
    let err = resolve(&strings(&["emial"]), &[], &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("unknown detector `emial`: built-in detectors are card, ssn, email"),
        "{err}"
    );
    assert!(
        err.contains("built-in presets are contact (email, phone)"),
        "{err}"
    );
    assert!(err.contains("all (every built-in)"), "{err}");

    let custom = vec![("badge".to_string(), "B[0-9]+".to_string(), None)];
    let presets = vec![("mine".to_string(), strings(&["badge", "nope"]))];
    let err = resolve(&strings(&["mine"]), &custom, &presets)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("unknown detector `nope`"), "{err}");
    assert!(err.ends_with("this policy defines badge, mine"), "{err}");

    let err = Masker::new(&[], &[DetectorSpec::Builtin("contact".into())]).unwrap_err();
    assert!(err.to_string().contains("built-in presets are"), "{err}");
}

#[test]
fn resolve_refuses_name_conflicts() {
    let custom = vec![("email".to_string(), "x".to_string(), None)];
    let err = resolve(&[], &custom, &[]).unwrap_err().to_string();
    assert_eq!(err, "`email` is a built-in detector");

    let presets = vec![("payment".to_string(), strings(&["card"]))];
    let err = resolve(&[], &[], &presets).unwrap_err().to_string();
    assert_eq!(err, "`payment` is a built-in preset");

    let custom = vec![("dup".to_string(), "x".to_string(), None)];
    let presets = vec![("dup".to_string(), strings(&["card"]))];
    let err = resolve(&[], &custom, &presets).unwrap_err().to_string();
    assert_eq!(err, "`dup` is both a detector and a preset");
}

// ---- columns ----

#[test]
fn masks_column_globs_case_insensitive() {
    let m = Masker::new(&strings(&["*card*", "ssn", "e?ail", "Straße"]), &[]).unwrap();
    assert!(m.masks_column("card_number"));
    assert!(m.masks_column("CreditCard"));
    assert!(m.masks_column("CARD"));
    assert!(m.masks_column("SSN"));
    assert!(m.masks_column("Email"));
    assert!(!m.masks_column("STRASSE")); // lowercasing, not full case folding
    assert!(m.masks_column("STRAßE"));
    assert!(!m.masks_column("ssn_hash"));
    assert!(!m.masks_column("eail"));
    assert!(!m.masks_column("name"));
    assert!(!m.has_detectors());

    let star = Masker::new(&strings(&["*"]), &[]).unwrap();
    assert!(star.masks_column("anything"));
    assert!(star.masks_column(""));
    let mid = Masker::new(&strings(&["a*b*c"]), &[]).unwrap();
    assert!(mid.masks_column("aXXbYYc"));
    assert!(mid.masks_column("abc"));
    assert!(!mid.masks_column("aXXbYY"));
}

#[test]
fn bad_globs() {
    for glob in ["", "card[0-9]", "{a,b}", r"a\*"] {
        let err = Masker::new(&strings(&[glob]), &[]).unwrap_err();
        assert!(matches!(err, MaskError::BadGlob { .. }), "{glob}: {err}");
    }
    let err = Masker::new(&strings(&["x[1]"]), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("only `*`"), "{err}");
}

// ---- mask_value ----

#[test]
fn mask_value_formats() {
    let m = Masker::new(&strings(&["*"]), &[]).unwrap();
    assert_eq!(m.mask_value(""), "");
    assert_eq!(m.mask_value("4111 1111 1111 1111"), "**** **** **** 1111");
    assert_eq!(m.mask_value("4111111111111111"), "************1111");
    assert_eq!(m.mask_value(" 5555-5555-5555-4444 "), "****-****-****-4444");
    assert_eq!(m.mask_value("123-45-6789"), "***-**-****");
    // Not a card (Luhn): nothing kept.
    assert_eq!(m.mask_value("4111111111111112"), "*".repeat(16));
    // Length classes.
    assert_eq!(m.mask_value("M"), "********");
    assert_eq!(m.mask_value("85000"), "********");
    assert_eq!(m.mask_value("12345678"), "********");
    assert_eq!(m.mask_value("123456789"), "*".repeat(16));
    assert_eq!(m.mask_value("ada@example.com"), "*".repeat(16));
    assert_eq!(m.mask_value(&"x".repeat(32)), "*".repeat(32));
    assert_eq!(m.mask_value(&"x".repeat(33)), "*".repeat(64));
    assert_eq!(m.mask_value(&"y".repeat(5000)), "*".repeat(64));
    // Characters, not bytes.
    assert_eq!(m.mask_value("éééééééé"), "********");
}

// ---- mask_text ----

#[test]
fn escaped_line_breaks_count_as_boundaries() {
    // JSON (or a C string) with `\n` or `\t` right before a value: the `n`
    // is not part of a word.
    let m = builtin(builtin_detector_names());
    assert_eq!(
        masked(&m, r#"{"note":"card:\n4111111111111111\nthanks"}"#),
        r#"{"note":"card:\n************1111\nthanks"}"#
    );
    assert_eq!(
        masked(&m, r#"key:\tsk-proj-Ab12Cd34Ef56Gh78Ij90KlMnOpQrStUv"#),
        r#"key:\t[REDACTED:api_key]"#
    );
    assert_eq!(masked(&m, r#"ssn\r\n123-45-6789"#), r#"ssn\r\n***-**-****"#);
    // A letter that is not an escape still joins the word.
    untouched(&m, "an4111111111111111");
}

#[test]
fn mask_text_several_findings() {
    let m = builtin(builtin_detector_names());
    let text = "Ada (ada@example.com, +44 20 7946 0958) paid with 4111 1111 1111 1111 \
                from DE89 3704 0044 0532 0130 00; SSN 123-45-6789; key AKIAIOSFODNN7EXAMPLE.";
    let (out, n) = m.mask_text(text);
    assert_eq!(
        out,
        "Ada (a***@example.com, +** ** **** ****) paid with **** **** **** 1111 \
         from DE** **** **** **** **** **; SSN ***-**-****; key [REDACTED:aws_key]."
    );
    assert_eq!(n, 6);
}

#[test]
fn mask_text_overlaps_take_the_leftmost_longest() {
    let m = builtin(&["jwt", "bearer_token", "phone"]);
    let text = format!("Authorization: Bearer {JWT_SAMPLE}");
    let (out, n) = m.mask_text(&text);
    // The JWT and the bearer token are the same span; the first detector wins.
    assert_eq!(out, "Authorization: Bearer [REDACTED:jwt]");
    assert_eq!(n, 1);
    // +1 555 ... is one international phone, not also a North American one.
    assert_eq!(masked(&m, "+1 415 555 2671"), "+* *** *** ****");
    assert_eq!(count(&m, "+1 415 555 2671"), 1);
}

#[test]
fn mask_text_borrows_when_nothing_found() {
    let m = builtin(builtin_detector_names());
    for text in [
        "",
        "hello world",
        "order 12345678 shipped 2024-01-15 at 12:30, total 1,234.56 EUR",
        "invoice 4111111111111112", // a candidate that fails its check
        "données personnelles: aucune — 東京 ✓",
    ] {
        untouched(&m, text);
    }
    let none = Masker::new(&[], &[]).unwrap();
    assert!(!none.has_detectors());
    untouched(&none, "ada@example.com");
}

#[test]
fn mask_text_non_ascii_is_safe() {
    let m = builtin(builtin_detector_names());
    let text = "Zoë’s card: 4111 1111 1111 1111 — e-mail zoë@example.com → ada@example.com, 電話 +81 3 1234 5678。";
    let (out, n) = m.mask_text(text);
    assert_eq!(
        out,
        "Zoë’s card: **** **** **** 1111 — e-mail z***@example.com → a***@example.com, 電話 +** * **** ****。"
    );
    assert_eq!(n, 4);
    // Internationalised addresses.
    assert_eq!(masked(&m, "ada@пример.рф,"), "a***@пример.рф,");
    assert_eq!(masked(&m, "Ëlise@exämple.de"), "Ë***@exämple.de");
    // Non-ASCII right against a finding, and findings at both ends.
    assert_eq!(masked(&m, "é4111111111111111é"), "é************1111é");
    // A custom pattern that can match inside multi-byte text.
    let spec = DetectorSpec::Custom {
        name: "kanji".into(),
        pattern: "東京".into(),
        checksum: None,
    };
    let k = Masker::new(&[], &[spec]).unwrap();
    assert_eq!(
        masked(&k, "ä東京ö東京"),
        "ä[REDACTED:kanji]ö[REDACTED:kanji]"
    );
}

#[test]
fn masker_is_send_sync_clone_debug() {
    fn assert_send_sync<T: Send + Sync + Clone + std::fmt::Debug>() {}
    assert_send_sync::<Masker>();
    let m = Masker::new(
        &strings(&["*card*"]),
        &[DetectorSpec::Builtin("email".into())],
    )
    .unwrap();
    let debug = format!("{m:?}");
    assert!(
        debug.contains("*card*") && debug.contains("email"),
        "{debug}"
    );
    // Duplicate detectors count once.
    let twice = Masker::new(
        &[],
        &[
            DetectorSpec::Builtin("email".into()),
            DetectorSpec::Builtin("email".into()),
        ],
    )
    .unwrap();
    assert_eq!(count(&twice, "a@example.com b@example.com"), 2);
}

#[test]
fn long_text_is_scanned_in_one_pass() {
    // Efficient by construction rather than timed: a long text with a few
    // findings far apart gives exactly those findings.
    let m = builtin(builtin_detector_names());
    let filler = "The quick brown fox jumps over the lazy dog 12345 times. ".repeat(2000);
    let text = format!("{filler}ada@example.com {filler}4111111111111111 {filler}");
    let (out, n) = m.mask_text(&text);
    assert_eq!(n, 2);
    assert_eq!(out.len(), text.len() + 1); // a***@ is one longer than ada@
    untouched(&m, &filler);
}

#[test]
fn rejected_candidates_are_not_searched_again_and_again() {
    // Texts built so that a detector that retried every position of a
    // rejected candidate would read them quadratically (seconds at this
    // size); all of these finish in a few milliseconds. The results are
    // what is checked.
    let m = builtin(builtin_detector_names());
    // One long email candidate, rejected for what follows its domain.
    let local = "a.".repeat(50_000);
    untouched(&m, &format!("{local}a@example.com_x"));
    // `sk-` again and again, no digit anywhere.
    untouched(&m, &"sk-".repeat(30_000));
    // Many BEGIN lines and no END line: each is masked on its own line.
    let headers = "-----BEGIN PRIVATE KEY-----\n".repeat(3_000);
    let (out, n) = m.mask_text(&headers);
    assert_eq!(n, 3_000);
    assert!(
        out == "[REDACTED:private_key]\n".repeat(3_000),
        "PEM headers"
    );
    // Digit groups that never form a card.
    untouched(&m, &"1111 ".repeat(20_000));
}
