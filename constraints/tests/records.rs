//! Prompt records: instruction layout, verification, HiR rewrite, serde format and the
//! JSONL loader's error reporting.

use hindsight_constraints::{
    generate_prompts, hir, load_jsonl, ConstraintError, ConstraintSpec, LoadError, PromptRecord,
    Template,
};
use serde_json::json;

fn record(template: Template) -> PromptRecord {
    serde_json::from_value(json!({
        "id": "r1",
        "question": "Write a haiku about rain.",
        "template": template,
        "constraints": [
            {"instruction_id": "punctuation:no_comma"},
            {"instruction_id": "keywords:existence", "kwargs": {"keywords": ["rain"]}},
            {"instruction_id": "startend:end_checker", "kwargs": {"end_phrase": "Peace!"}},
            {"instruction_id": "detectable_format:title", "kwargs": {"unused": null}},
        ]
    }))
    .unwrap()
}

const NO_COMMA: &str = "In your entire response, refrain from the use of any commas.";
const RAIN: &str = "Include keywords ['rain'] in the response.";
const PEACE: &str =
    "Finish your response with this exact phrase Peace!. No other words should follow this phrase.";
const TITLE: &str =
    "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.";

#[test]
fn template_serde_names() {
    for (t, name) in Template::ALL
        .iter()
        .zip(["type1", "type2", "type3", "type4", "type5", "type6"])
    {
        assert_eq!(serde_json::to_value(t).unwrap(), json!(name));
        assert_eq!(serde_json::from_value::<Template>(json!(name)).unwrap(), *t);
    }
    assert_eq!(Template::default(), Template::Type1);
    let r: PromptRecord =
        serde_json::from_str(r#"{"id":"x","question":"q","constraints":[]}"#).unwrap();
    assert_eq!(r.template, Template::Type1);
}

#[test]
fn full_instruction_uses_all_constraints() {
    let c = record(Template::Type1).compile().unwrap();
    assert_eq!(c.descriptions, vec![NO_COMMA, RAIN, PEACE, TITLE]);
    assert_eq!(
        c.instruction(),
        format!("Write a haiku about rain. {NO_COMMA} {RAIN} {PEACE} {TITLE}")
    );
    let c = record(Template::Type3).compile().unwrap();
    assert_eq!(
        c.instruction(),
        format!(
            "Write a haiku about rain.\n\nThe output must follow the following rules:\n1. {NO_COMMA}\n2. {RAIN}\n3. {PEACE}\n4. {TITLE}"
        )
    );
}

#[test]
fn verify_and_rewrite_keep_exactly_the_satisfied_constraints() {
    let c = record(Template::Type4).compile().unwrap();
    let response = "<<Rain>>\nsoft rain, on the roof\nPeace!";
    let verdicts = c.verify(response);
    assert_eq!(verdicts, vec![false, true, true, true]);
    assert_eq!(hir::reward(&verdicts), 0.0);
    assert_eq!(hir::constraint_accuracy(&verdicts), 0.75);
    let rw = c.rewrite(&verdicts).unwrap();
    assert_eq!(rw.kept, vec![1, 2, 3]);
    assert_eq!(
        rw.kept_ids,
        vec![
            "keywords:existence",
            "startend:end_checker",
            "detectable_format:title"
        ]
    );
    assert_eq!(
        rw.instruction,
        format!("Write a haiku about rain.\n\n- {RAIN}\n- {PEACE}\n- {TITLE}")
    );

    let rw = c.rewrite(&[true, false, true, false]).unwrap();
    assert_eq!(rw.kept, vec![0, 2]);
    assert_eq!(
        rw.instruction,
        format!("Write a haiku about rain.\n\n- {NO_COMMA}\n- {PEACE}")
    );
    // short verdict lists: missing entries count as unsatisfied; extras are ignored
    assert_eq!(c.rewrite(&[false, true]).unwrap().kept, vec![1]);
    assert_eq!(c.rewrite(&[false, false, false, false, true]), None);
    assert_eq!(c.rewrite(&[false; 4]), None);
    assert_eq!(c.rewrite(&[]), None);

    let all = c.verify("<<Rain>>\nrain on the roof\nPeace!");
    assert_eq!(all, vec![true; 4]);
    assert_eq!(hir::reward(&all), 1.0);
    assert_eq!(c.rewrite(&all).unwrap().instruction, c.instruction());
}

#[test]
fn each_template_in_rewrite() {
    let expected = [
        format!("Write a haiku about rain. {RAIN} {TITLE}"),
        format!("Write a haiku about rain.\n{RAIN} {TITLE}"),
        format!("Write a haiku about rain.\n\nThe output must follow the following rules:\n1. {RAIN}\n2. {TITLE}"),
        format!("Write a haiku about rain.\n\n- {RAIN}\n- {TITLE}"),
        format!("{RAIN} {TITLE}\n\nWrite a haiku about rain."),
        format!("Write a haiku about rain.\n\n{RAIN}\n{TITLE}"),
    ];
    for (t, want) in Template::ALL.into_iter().zip(expected) {
        let c = record(t).compile().unwrap();
        assert_eq!(
            c.rewrite(&[false, true, false, true]).unwrap().instruction,
            want,
            "{t:?}"
        );
    }
}

#[test]
fn empty_response_fails_everything() {
    let c = record(Template::Type2).compile().unwrap();
    for r in ["", " ", "\n\t \u{3000}"] {
        assert_eq!(c.verify(r), vec![false; 4]);
        assert!(c.rewrite(&c.verify(r)).is_none());
    }
    // no_comma alone would accept an empty text; verify must not
    let only: PromptRecord = serde_json::from_value(json!({
        "id": "x", "question": "q", "constraints": [{"instruction_id": "punctuation:no_comma"}]
    }))
    .unwrap();
    assert_eq!(only.compile().unwrap().verify(""), vec![false]);
}

#[test]
fn compile_reports_bad_constraints() {
    let mut r = record(Template::Type1);
    r.constraints
        .push(ConstraintSpec::new("nope:x", Default::default()));
    assert_eq!(
        r.compile().err(),
        Some(ConstraintError::UnknownId("nope:x".into()))
    );
}

fn write_temp(name: &str, content: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("hindsight-constraints-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

#[test]
fn loader_round_trip_and_errors() {
    let records = generate_prompts(3, 20);
    let text: String = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect::<String>()
        + "\n";
    let path = write_temp("ok.jsonl", &text);
    assert_eq!(load_jsonl(&path).unwrap(), records);

    let good = serde_json::to_string(&records[0]).unwrap();
    let other = serde_json::to_string(&records[1]).unwrap();

    // bad JSON on line 3
    let path = write_temp("bad_json.jsonl", &format!("{good}\n{other}\n{{\"id\": \n"));
    let err = load_jsonl(&path).unwrap_err();
    assert!(matches!(err, LoadError::Json { line: 3, .. }), "{err:?}");
    assert_eq!(err.line(), Some(3));
    assert!(err.to_string().starts_with("line 3:"), "{err}");

    // unknown instruction id on line 2 (line 1 blank)
    let bad = good.replacen(
        &records[0].constraints[0].instruction_id,
        "keywords:telepathy",
        1,
    );
    let path = write_temp("unknown_id.jsonl", &format!("\n{bad}\n"));
    let err = load_jsonl(&path).unwrap_err();
    match &err {
        LoadError::Constraint {
            line: 2,
            index: 0,
            source: ConstraintError::UnknownId(id),
            ..
        } => {
            assert_eq!(id, "keywords:telepathy")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string().contains("line 2") && err.to_string().contains("keywords:telepathy"),
        "{err}"
    );

    // bad kwargs
    let path = write_temp(
        "bad_kwargs.jsonl",
        r#"{"id":"a","question":"q","constraints":[{"instruction_id":"length_constraints:number_words","kwargs":{"num_words":"many","relation":"at least"}}]}"#,
    );
    let err = load_jsonl(&path).unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::Constraint {
                line: 1,
                source: ConstraintError::BadKwargs { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("num_words"), "{err}");

    // missing field, wrong template, no constraints, duplicate id
    for (content, line) in [
        (r#"{"id":"a","constraints":[]}"#.to_string(), 1),
        (
            format!(
                "{good}\n{}",
                good.replace("\"template\":\"type", "\"template\":\"kind")
            ),
            2,
        ),
        (
            r#"{"id":"a","question":"q","constraints":[]}"#.to_string(),
            1,
        ),
        (format!("{good}\n{other}\n{good}"), 3),
    ] {
        let path = write_temp("misc.jsonl", &content);
        let err = load_jsonl(&path).unwrap_err();
        assert_eq!(err.line(), Some(line), "{err}");
    }

    // missing file
    let err = load_jsonl(std::path::Path::new("/nonexistent/prompts.jsonl")).unwrap_err();
    assert!(matches!(err, LoadError::Io { .. }) && err.line().is_none());
}
