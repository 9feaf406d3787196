//! `ferrotune plot` and the training_curves.png that `train` writes: the
//! PNG's size as stated, a drawn curve in every panel, the eval loss on the
//! loss panel, and errors that name metrics.jsonl and the bad line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ferrotune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).current_dir(repo()).output().expect("run ferrotune")
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "ferrotune failed:\n{err}");
    err
}

fn fails(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected a failure:\n{err}");
    err
}

/// The quickstart, short, with evaluations and a checkpoint on the way.
fn train_quickstart(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "examples/quickstart/quickstart.yml"];
    let dir = format!("output_dir={}", out.display());
    let sets = ["max_steps=20", "logging_steps=2", "val_set_size=4", "eval_steps=10", "save_steps=10", "device=cpu", &dir];
    for s in sets.iter().chain(extra) {
        args.extend(["--set", s]);
    }
    ferrotune(&args)
}

/// (width, height) from the PNG signature and the IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR", "the first chunk is not IHDR");
    let be = |o: usize| u32::from_be_bytes(bytes[o..o + 4].try_into().unwrap());
    (be(16), be(20))
}

/// RGB pixels, row by row.
fn decode(bytes: &[u8]) -> (Vec<u8>, u32, u32) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().expect("a decodable PNG");
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (buf, info.width, info.height)
}

/// The "WxH pixels; panels: a, b" that `plot` states.
fn stated(stderr: &str) -> ((u32, u32), Vec<String>) {
    let (_, s) = stderr.split_once(" (").expect("a stated size");
    let (size, rest) = s.split_once(" pixels; panels: ").expect("panels stated");
    let (w, h) = size.split_once('x').unwrap();
    let panels = rest.rsplit_once(") in ").unwrap().0.split(", ").map(String::from).collect();
    ((w.parse().unwrap(), h.parse().unwrap()), panels)
}

/// Pixels of colour `c` (within a small tolerance) in each panel cell:
/// two panels a row under a 40-pixel header, row by row.
fn count_in_panels(png: &[u8], n: usize, c: impl Fn([u8; 3]) -> bool) -> Vec<usize> {
    let (rgb, w, h) = decode(png);
    let (cols, rows) = (n.min(2), n.div_ceil(2));
    let (cw, ch) = (w as usize / cols, (h as usize - 40) / rows);
    (0..n)
        .map(|i| {
            let (x0, y0) = ((i % cols) * cw, 40 + (i / cols) * ch);
            let mut k = 0;
            for y in y0..y0 + ch {
                for x in x0..x0 + cw {
                    let p = (y * w as usize + x) * 3;
                    k += usize::from(c([rgb[p], rgb[p + 1], rgb[p + 2]]));
                }
            }
            k
        })
        .collect()
}

/// A curve pixel: grid, frame and text are all grey; the curves are not.
fn coloured(p: [u8; 3]) -> bool {
    let (lo, hi) = (p.iter().min().unwrap(), p.iter().max().unwrap());
    hi - lo > 60
}

/// The eval curve's orange (230, 110, 20).
fn orange(p: [u8; 3]) -> bool {
    p[0] > 200 && (90..=130).contains(&p[1]) && p[2] < 50
}

#[test]
fn train_writes_curves_and_plot_redraws_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    ok(&train_quickstart(&out, &[]));
    let drawn = std::fs::read(out.join("training_curves.png")).expect("train wrote training_curves.png");
    std::fs::remove_file(out.join("training_curves.png")).unwrap();

    let err = ok(&ferrotune(&["plot", out.to_str().unwrap()]));
    let ((w, h), panels) = stated(&err);
    assert!(err.starts_with(&format!("wrote {}", out.join("training_curves.png").display())), "{err}");
    assert_eq!(panels, ["loss", "learning rate", "gradient norm (before clipping)", "throughput"]);
    let png = std::fs::read(out.join("training_curves.png")).expect("plot wrote training_curves.png");
    assert_eq!(png_size(&png), (w, h));
    assert_eq!(png_size(&drawn), (w, h), "train draws the same panels");
    assert_eq!((w, h), (1280, 40 + 2 * 360));
    let curve = count_in_panels(&png, 4, coloured);
    assert!(curve.iter().all(|&k| k > 200), "a panel without a curve: {curve:?}");
    let eval = count_in_panels(&png, 4, orange);
    assert!(eval[0] > 50 && eval[1..].iter().all(|&k| k == 0), "eval loss only on the loss panel: {eval:?}");
    let left: Vec<_> = std::fs::read_dir(&out).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    assert!(!left.iter().any(|n| n.ends_with(".tmp")), "a temporary file left behind: {left:?}");
}

#[test]
fn preference_metrics_get_reward_panels_and_out_is_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    // Records as a DPO run with validation logs them.
    let mut lines = Vec::new();
    for step in 1..=6 {
        let s = step as f64;
        lines.push(serde_json::json!({
            "step": step, "epoch": s / 3.0, "loss": 0.7 / s, "lr": 2e-3, "grad_norm": 7.0 / s, "tokens_per_s": 6000.0 + 100.0 * s,
            "tokens": 250 * step, "rewards/chosen": 0.2 * s, "rewards/rejected": -2.0 * s, "rewards/margins": 2.2 * s,
            "rewards/accuracies": (s / 3.0).min(1.0), "logps/chosen": -200.0 + s, "logps/rejected": -280.0 - 20.0 * s,
        }));
        if step % 3 == 0 {
            lines.push(serde_json::json!({
                "step": step, "eval_loss": 0.5 / s, "eval_rewards/margins": 2.0 * s, "eval_rewards/accuracies": 0.75,
                "eval_rewards/chosen": 0.1 * s, "eval_rewards/rejected": -1.9 * s,
            }));
        }
    }
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(tmp.path().join("metrics.jsonl"), text).unwrap();
    let file = tmp.path().join("curves/dpo.png");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let err = ok(&ferrotune(&["plot", tmp.path().to_str().unwrap(), "--out", file.to_str().unwrap()]));
    let ((w, h), panels) = stated(&err);
    assert_eq!(
        panels,
        [
            "loss", "learning rate", "gradient norm (before clipping)", "throughput", "reward margin (chosen - rejected)",
            "reward accuracy", "rewards", "log-probs",
        ]
    );
    let png = std::fs::read(&file).expect("--out names the PNG");
    assert_eq!(png_size(&png), (w, h));
    assert_eq!((w, h), (1280, 40 + 4 * 360));
    assert!(!tmp.path().join("training_curves.png").exists(), "--out replaces the default path");
    let curve = count_in_panels(&png, 8, coloured);
    assert!(curve.iter().all(|&k| k > 200), "a panel without a curve: {curve:?}");
    let eval = count_in_panels(&png, 8, orange);
    for (i, k) in eval.iter().enumerate() {
        // loss, margin and accuracy carry eval points.
        assert_eq!(*k > 50, [0, 4, 5].contains(&i), "panel {} ({}): {k} eval pixels", i, panels[i]);
    }
}

#[test]
fn bad_metrics_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let metrics = tmp.path().join("metrics.jsonl");

    let err = fails(&ferrotune(&["plot", dir]));
    assert_eq!(err.trim(), format!("error: {} does not exist: is {dir} the output_dir of a training run?", metrics.display()));

    std::fs::write(&metrics, "").unwrap();
    let err = fails(&ferrotune(&["plot", dir]));
    assert!(err.starts_with(&format!("error: {} has no records", metrics.display())), "{err}");

    std::fs::write(&metrics, "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1.5\n").unwrap();
    let err = fails(&ferrotune(&["plot", dir]));
    assert!(err.starts_with(&format!("error: {} line 2: not valid JSON", metrics.display())), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    std::fs::write(&metrics, "{\"step\":1,\"loss\":2.0}\n{\"loss\":1.5}\n").unwrap();
    let err = fails(&ferrotune(&["plot", dir]));
    assert_eq!(err.trim(), format!("error: {} line 2: the record has no \"step\" number", metrics.display()));

    std::fs::write(&metrics, "{\"step\":1,\"epoch\":0.5}\n").unwrap();
    let err = fails(&ferrotune(&["plot", dir]));
    assert!(err.starts_with(&format!("error: {} has no metric to plot", metrics.display())), "{err}");
    assert!(!tmp.path().join("training_curves.png").exists(), "nothing drawn on an error");
}

#[test]
fn a_failed_drawing_warns_without_failing_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // A directory where the PNG goes: the rename onto it fails.
    std::fs::create_dir_all(out.join("training_curves.png/x")).unwrap();
    let err = ok(&train_quickstart(&out, &[]));
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("training_curves.png not drawn")).collect();
    // One at the step-10 checkpoint, one at the end.
    assert_eq!(warnings.len(), 2, "{err}");
    assert!(warnings.iter().all(|w| w.starts_with(&format!("warning: {}", out.join("training_curves.png").display()))), "{err}");
    assert!(out.join("adapter_model.safetensors").is_file(), "the run finished: {err}");
}

#[test]
fn a_checkpoint_before_the_first_record_draws_nothing_and_warns_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // Checkpoint at step 5, first record at the last step (10).
    let err = ok(&train_quickstart(&out, &["max_steps=10", "logging_steps=20", "save_steps=5", "val_set_size=0"]));
    assert!(!err.contains("warning"), "{err}");
    let png = std::fs::read(out.join("training_curves.png")).expect("drawn at the end");
    assert_eq!(png_size(&png), (1280, 40 + 2 * 360));
}
