//! The built-in rewards on GSM8K-style, boxed and formatted answers, their
//! config parsing and its errors.

use super::*;
use serde_json::{Map, json};

fn scored_with<'a>(completion: &'a Value, ids: &'a [u32], columns: &'a Map<String, Value>) -> Scored<'a> {
    static PROMPT: Value = Value::Null;
    Scored { prompt: &PROMPT, completion, completion_ids: ids, columns }
}

fn cols(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// The answer_match reward of `completion` against column `answer`.
fn answer_reward(answer: Value, completion: Value) -> Option<f64> {
    let b = Builtin::parse("builtin:answer_match").unwrap();
    let columns = cols(json!({ "answer": answer }));
    b.score("builtin:answer_match", 1, &scored_with(&completion, &[], &columns)).unwrap()
}

#[test]
fn gsm8k_reference_and_hash_answers() {
    let reference = json!("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72");
    assert_eq!(answer_reward(reference.clone(), json!("She sold 48 + 24 = 72 clips.\n#### 72")), Some(1.0));
    assert_eq!(answer_reward(reference.clone(), json!("#### 72.0")), Some(1.0));
    assert_eq!(answer_reward(reference.clone(), json!("#### 71")), Some(0.0));
    // The last "####" counts, not the first.
    assert_eq!(answer_reward(reference.clone(), json!("#### 12\nno wait\n#### 72")), Some(1.0));
    assert_eq!(answer_reward(reference, json!("#### 72\nactually #### 70")), Some(0.0));
}

#[test]
fn boxed_answers_nested_braces_and_the_last_box() {
    assert_eq!(answer_reward(json!("#### 18"), json!("so \\boxed{17} is wrong, the total is \\boxed{18}.")), Some(1.0));
    assert_eq!(answer_reward(json!("\\frac{1}{2}"), json!("Thus $\\boxed{\\frac{1}{2}}$")), Some(1.0));
    assert_eq!(answer_reward(json!("\\frac{1}{3}"), json!("Thus $\\boxed{\\frac{1}{2}}$")), Some(0.0));
    // An unclosed box is not an answer; the last number is then used.
    assert_eq!(answer_reward(json!("5"), json!("about 5 \\boxed{7")), Some(0.0));
    assert_eq!(final_answer("about 5 \\boxed{x"), Some("5".into()));
    // "####" wins over a box.
    assert_eq!(final_answer("\\boxed{3}\n#### 4"), Some("4".into()));
}

#[test]
fn commas_dollars_and_trailing_points_compare_as_numbers() {
    assert_eq!(answer_reward(json!("#### 1234"), json!("The cost is $1,234.")), Some(1.0));
    assert_eq!(answer_reward(json!("#### 1,234"), json!("#### $1234.00")), Some(1.0));
    assert_eq!(answer_reward(json!("#### 0.5"), json!("#### .5")), Some(1.0));
    assert_eq!(answer_reward(json!("#### 1234"), json!("The cost is $1,235.")), Some(0.0));
    assert_eq!(as_number("$1,234.50."), Some(1234.5));
    assert_eq!(as_number("inf"), None);
    assert_eq!(as_number("nan"), None);
    assert_eq!(as_number("$"), None);
}

#[test]
fn last_number_signs_and_sentence_ends() {
    assert_eq!(final_answer("In 2023 she had 3 cats, then -4 of them left."), Some("-4".into()));
    assert_eq!(final_answer("5-3"), Some("3".into()));
    assert_eq!(final_answer("x = -3."), Some("-3".into()));
    assert_eq!(final_answer("The answer is 42."), Some("42".into()));
    assert_eq!(final_answer("no digits at all"), None);
    assert_eq!(answer_reward(json!("42"), json!("no digits at all")), Some(0.0));
}

#[test]
fn text_answers_compare_trimmed() {
    assert_eq!(answer_reward(json!("#### Paris "), json!("The capital:\n#### Paris\n")), Some(1.0));
    assert_eq!(answer_reward(json!("Paris"), json!("#### paris")), Some(0.0));
}

#[test]
fn numeric_columns_conversations_and_null_references() {
    assert_eq!(answer_reward(json!(72), json!("#### 72")), Some(1.0));
    assert_eq!(answer_reward(json!(2.5), json!("\\boxed{2.50}")), Some(1.0));
    let conversation = json!([{"role": "assistant", "content": "Adding up: 3 + 4 = 7\n#### 7"}]);
    assert_eq!(answer_reward(json!("#### 7"), conversation), Some(1.0));
    let parts = json!([{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{"}, {"type": "text", "text": "9}"}]}]);
    assert_eq!(answer_reward(json!("9"), parts), Some(1.0));
    assert_eq!(answer_reward(Value::Null, json!("#### 7")), None);
}

#[test]
fn answer_match_column_errors_name_the_function_step_and_columns() {
    let b = Builtin::parse("builtin:answer_match:solution").unwrap();
    let columns = cols(json!({ "answer": "1", "level": 3 }));
    let completion = json!("#### 1");
    let err = b.score("builtin:answer_match:solution", 4, &scored_with(&completion, &[], &columns)).unwrap_err().to_string();
    assert_eq!(err, "reward function `builtin:answer_match:solution` at step 4: the row has no column `solution` (it has: answer, level)");
    let columns = cols(json!({ "solution": ["1"] }));
    let err = b.score("builtin:answer_match:solution", 2, &scored_with(&completion, &[], &columns)).unwrap_err().to_string();
    assert!(err.contains("column `solution` holds a list"), "{err}");
}

#[test]
fn format_searches_across_lines_and_honours_anchors() {
    let think = "builtin:format:^<think>.*?</think>\\s*<answer>.*?</answer>$";
    let b = Builtin::parse(think).unwrap();
    let columns = Map::new();
    let score = |b: &Builtin, text: &str| {
        let v = json!(text);
        b.score("f", 1, &scored_with(&v, &[], &columns)).unwrap()
    };
    assert_eq!(score(&b, "<think>\nstep 1\nstep 2\n</think>\n<answer>7</answer>"), Some(1.0));
    assert_eq!(score(&b, "preamble <think>x</think><answer>7</answer>"), Some(0.0));
    assert_eq!(score(&b, "<think>x</think><answer>7</answer> trailing"), Some(0.0));
    let unanchored = Builtin::parse("builtin:format:<answer>\\d+</answer>").unwrap();
    assert_eq!(score(&unanchored, "text\n<answer>12</answer> more"), Some(1.0));
    assert_eq!(score(&unanchored, "<answer>twelve</answer>"), Some(0.0));
    // A colon inside the regex belongs to it.
    let colon = Builtin::parse("builtin:format:Answer: \\d").unwrap();
    assert_eq!(score(&colon, "Answer: 4"), Some(1.0));
}

#[test]
fn length_penalises_tokens_past_the_target() {
    let b = Builtin::parse("builtin:length:4").unwrap();
    let columns = Map::new();
    let v = json!("");
    let score = |n: usize| {
        let ids = vec![1u32; n];
        b.score("builtin:length:4", 1, &scored_with(&v, &ids, &columns)).unwrap().unwrap()
    };
    assert_eq!(score(0), 0.0);
    assert_eq!(score(4), 0.0);
    assert_eq!(score(5), -0.25);
    assert_eq!(score(10), -1.5);
}

#[test]
fn parse_errors_are_one_clear_line() {
    let err = |name: &str| Builtin::parse(name).unwrap_err().to_string();
    assert_eq!(err("builtin:length:0"), "reward function `builtin:length:0`: the target length must be a whole number of tokens above 0, not `0`");
    assert!(err("builtin:length:abc").contains("not `abc`"));
    assert!(err("builtin:length").contains("expected builtin:length:TARGET"));
    assert!(err("builtin:format").contains("expected builtin:format:REGEX"));
    let bad = err("builtin:format:(unclosed");
    assert_eq!(bad, "reward function `builtin:format:(unclosed`: `(unclosed` is not a valid regular expression (unclosed group)");
    let unknown = err("builtin:accuracy");
    assert!(unknown.contains("unknown built-in `accuracy`") && unknown.contains(KNOWN), "{unknown}");
    assert!(err("builtin:answer_match:").contains("column name after `answer_match:` is empty"));
}

#[test]
fn conversational_completion_text() {
    assert_eq!(completion_text(&json!([])).unwrap(), "");
    assert!(completion_text(&json!(3)).unwrap_err().contains("is a number"));
    assert!(completion_text(&json!([{"role": "assistant", "content": 3}])).unwrap_err().contains("a number as content"));
}
