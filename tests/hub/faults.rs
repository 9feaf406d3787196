//! `ferrotune download` when transfers go wrong (against the mock Hub's
//! injected faults): cut bodies resumed with `Range: bytes=K-` within a
//! run or by the next one, servers that ignore Range, corrupted bytes, a
//! run killed mid-file; and many files fetched in parallel.

use crate::hub_cli::{Sandbox, assert_phrases, snapshot_files};
use crate::hub_tree::{MODEL_ID, model_repo, pseudo_bytes};
use crate::mock_hub::{Fault, Logged, MockFile, MockHub, MockRepo, sha256_hex};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const FOLDER: &str = "models--ferrotune-test--tiny-model";
const WEIGHTS: &str = "model.safetensors";

fn weights() -> MockFile {
    model_repo().file("main", WEIGHTS).clone()
}

fn blob(sb: &Sandbox) -> PathBuf {
    sb.repo_dir(FOLDER).join("blobs").join(weights().etag())
}

fn incomplete(sb: &Sandbox) -> PathBuf {
    sb.repo_dir(FOLDER).join("blobs").join(format!("{}.incomplete", weights().etag()))
}

fn link(sb: &Sandbox) -> PathBuf {
    sb.repo_dir(FOLDER).join("snapshots").join(model_repo().commit_of("main")).join(WEIGHTS)
}

fn cdn_gets(hub: &MockHub) -> Vec<Logged> {
    hub.requests().into_iter().filter(|r| r.method == "GET" && r.target.starts_with("/cdn/")).collect()
}

/// The blob holds exactly the file's bytes and nothing partial is left.
fn assert_whole(sb: &Sandbox) {
    assert_eq!(sha256_hex(&std::fs::read(blob(sb)).unwrap()), weights().etag());
    assert_eq!(std::fs::read(link(sb)).unwrap(), weights().bytes);
    assert!(!incomplete(sb).exists());
}

/// A run whose body is cut after 1000 bytes and whose retries are refused
/// (403, as for an expired signed CDN URL) fails, keeping the bytes in
/// `.incomplete` and no blob or link. Returns the bytes kept.
fn fail_after_a_cut(hub: &MockHub, sb: &Sandbox) -> u64 {
    hub.fault(WEIGHTS, Fault::CutAfter { bytes: 1000, times: 1 });
    hub.fault(WEIGHTS, Fault::Status { code: 403, times: 1000 });
    let e = sb.download(&[MODEL_ID, "--include", WEIGHTS]).error();
    assert_phrases(&e, &[MODEL_ID]);
    hub.clear_faults();
    let kept = std::fs::metadata(incomplete(sb)).map(|m| m.len()).unwrap_or(0);
    assert!(kept > 0 && kept <= 1000, "{kept} bytes kept in .incomplete");
    assert!(!blob(sb).exists() && std::fs::symlink_metadata(link(sb)).is_err());
    kept
}

/// The next run asks for the rest with `Range: bytes=K-` and completes.
#[test]
fn a_cut_download_is_resumed_by_the_next_run() {
    let hub = MockHub::start(vec![model_repo()]);
    let sb = Sandbox::new(&hub.url());
    let kept = fail_after_a_cut(&hub, &sb);
    hub.clear_requests();
    sb.download(&[MODEL_ID, "--include", WEIGHTS]).snapshot();
    let gets = cdn_gets(&hub);
    let want = format!("bytes={kept}-");
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!((gets[0].header("range"), gets[0].status), (Some(want.as_str()), 206));
    assert_whole(&sb);
}

/// A server that answers the Range with 200 and the whole file: the
/// partial bytes are dropped, not prepended.
#[test]
fn a_server_ignoring_the_range_restarts_the_file() {
    let hub = MockHub::start(vec![model_repo()]);
    let sb = Sandbox::new(&hub.url());
    let kept = fail_after_a_cut(&hub, &sb);
    hub.fault(WEIGHTS, Fault::IgnoreRange);
    hub.clear_requests();
    sb.download(&[MODEL_ID, "--include", WEIGHTS]).snapshot();
    let gets = cdn_gets(&hub);
    let want = format!("bytes={kept}-");
    assert_eq!((gets[0].header("range"), gets[0].status), (Some(want.as_str()), 200), "{gets:?}");
    assert_whole(&sb);
}

/// One cut connection: resumed within the same run, from the bytes kept,
/// with a Range.
#[test]
fn a_cut_connection_resumes_with_a_range() {
    let hub = MockHub::start(vec![model_repo()]);
    let sb = Sandbox::new(&hub.url());
    hub.fault(WEIGHTS, Fault::CutAfter { bytes: 1000, times: 1 });
    sb.download(&[MODEL_ID, "--include", WEIGHTS]).snapshot();
    let gets = cdn_gets(&hub);
    assert_eq!(gets[0].header("range"), None, "{gets:?}");
    let resumed = gets.iter().skip(1).find_map(|r| r.header("range")?.strip_prefix("bytes=")?.strip_suffix('-')?.parse::<u64>().ok());
    assert!(resumed.is_some_and(|k| k > 0 && k <= 1000), "{gets:?}");
    assert_whole(&sb);
}

/// A server that ignores Range and cuts every body at the same point never
/// gets further: one error line after a few rounds, not an endless loop,
/// and no blob or link.
#[test]
fn a_transfer_that_never_progresses_ends_with_an_error() {
    let hub = MockHub::start(vec![model_repo()]);
    let sb = Sandbox::new(&hub.url());
    hub.fault(WEIGHTS, Fault::CutAfter { bytes: 1000, times: 1000 });
    hub.fault(WEIGHTS, Fault::IgnoreRange);
    let e = sb.download(&[MODEL_ID, "--include", WEIGHTS]).error();
    assert_phrases(&e, &[WEIGHTS, " of ", MODEL_ID]);
    let gets = cdn_gets(&hub).len();
    assert!((2..=10).contains(&gets), "{gets} GETs");
    assert!(!blob(&sb).exists() && std::fs::symlink_metadata(link(&sb)).is_err());
}

/// Two processes fetching the same file into one cache: the second waits on
/// the blob's lock (`.locks/…/<etag>.lock`, the one huggingface_hub takes),
/// then links the finished blob; the bytes are fetched once.
#[test]
fn two_processes_share_one_download() {
    let hub = MockHub::start(vec![model_repo()]);
    let sb = Sandbox::new(&hub.url());
    hub.fault(WEIGHTS, Fault::Pause { bytes: 100, ms: 1500 });
    let spawn = || {
        sb.cmd(&["download", MODEL_ID, "--include", WEIGHTS])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = spawn();
    std::thread::sleep(Duration::from_millis(200));
    let second = spawn();
    let (a, b) = (first.wait_with_output().unwrap(), second.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success(), "{} / {}", String::from_utf8_lossy(&a.stderr), String::from_utf8_lossy(&b.stderr));
    assert_whole(&sb);
    assert_eq!(cdn_gets(&hub).len(), 1, "the weights were fetched more than once");
    let waited = [&a, &b].iter().filter(|o| String::from_utf8_lossy(&o.stderr).contains("waiting for another process")).count();
    assert_eq!(waited, 1);
}

/// A 500 (the HEAD's or the storage host's) is retried and the file
/// completes.
#[test]
fn server_errors_are_retried() {
    let hub = MockHub::start(vec![model_repo()]);
    let sb = Sandbox::new(&hub.url());
    hub.fault(WEIGHTS, Fault::ServerError { times: 2 });
    sb.download(&[MODEL_ID, "--include", WEIGHTS]).snapshot();
    assert_whole(&sb);
    let errors = hub.requests().iter().filter(|r| r.status == 500).count();
    assert_eq!(errors, 2);
}

/// A flipped byte: the sha256 error names the file and the repo, the bad
/// bytes are gone (no blob, link or .incomplete), and a rerun succeeds.
#[test]
fn corrupted_bytes_are_refused_and_deleted() {
    let hub = MockHub::start(vec![model_repo()]);
    let sb = Sandbox::new(&hub.url());
    hub.fault(WEIGHTS, Fault::Corrupt { times: 1 });
    let e = sb.download(&[MODEL_ID, "--include", WEIGHTS]).error();
    assert_phrases(&e, &[WEIGHTS, " of ", MODEL_ID, "sha256 mismatch", "rerun"]);
    assert!(!blob(&sb).exists() && !incomplete(&sb).exists() && std::fs::symlink_metadata(link(&sb)).is_err());
    let blobs: Vec<_> = std::fs::read_dir(sb.repo_dir(FOLDER).join("blobs")).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(blobs.is_empty(), "{blobs:?}");
    sb.download(&[MODEL_ID, "--include", WEIGHTS]).snapshot();
    assert_whole(&sb);
}

/// Killed mid-file: only `.incomplete` holds bytes, no blob and no link
/// exist at any time; the next run resumes from what was kept.
#[test]
fn a_killed_run_leaves_no_blob_and_is_resumed() {
    let hub = MockHub::start(vec![model_repo()]);
    let sb = Sandbox::new(&hub.url());
    hub.fault(WEIGHTS, Fault::Pause { bytes: 1000, ms: 4000 });
    let mut child = sb.cmd(&["download", MODEL_ID, "--include", WEIGHTS]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while std::fs::metadata(incomplete(&sb)).map(|m| m.len()).unwrap_or(0) < 1000 {
        assert!(t0.elapsed() < Duration::from_secs(10), "no .incomplete with the first 1000 bytes appeared");
        assert!(!blob(&sb).exists() && std::fs::symlink_metadata(link(&sb)).is_err());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!blob(&sb).exists() && std::fs::symlink_metadata(link(&sb)).is_err());
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = std::fs::metadata(incomplete(&sb)).unwrap().len();
    assert_eq!(kept, 1000);
    hub.clear_faults();
    hub.clear_requests();
    sb.download(&[MODEL_ID, "--include", WEIGHTS]).snapshot();
    let gets = cdn_gets(&hub);
    assert_eq!((gets.len(), gets[0].header("range")), (1, Some("bytes=1000-")), "{gets:?}");
    assert_whole(&sb);
}

/// Twenty files, each answered slowly, are fetched several at a time (at
/// most 8, huggingface_hub's worker count) and all land whole; with
/// HF_HUB_DISABLE_PROGRESS_BARS no bar is drawn.
#[test]
fn many_files_download_in_parallel() {
    let files: Vec<MockFile> = (0..20).map(|i| MockFile::lfs(&format!("shards/shard-{i:02}.safetensors"), pseudo_bytes(100 + i, 16 * 1024))).collect();
    let repo = MockRepo::model("org/many", files.clone());
    let hub = MockHub::start(vec![repo]);
    for f in &files {
        hub.fault(&f.path, Fault::Pause { bytes: 0, ms: 150 });
    }
    let sb = Sandbox::new(&hub.url());
    let r = sb.download(&["org/many", "--include", "*"]);
    let snap = r.snapshot();
    let want: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
    assert_eq!(snapshot_files(&snap), want);
    for f in &files {
        assert_eq!(std::fs::read(snap.join(&f.path)).unwrap(), f.bytes, "{}", f.path);
    }
    let most = hub.max_concurrent();
    assert!((2..=8).contains(&most), "{most} requests at once");
    assert!(!r.stderr.contains("shard-"), "progress drawn: {}", r.stderr);

    // With progress on and stderr not a terminal (a log), one line per
    // file with its size, instead of bars.
    let sb = Sandbox::new(&hub.url());
    let r = sb.download_env(&["org/many", "--include", "*"], &[("HF_HUB_DISABLE_PROGRESS_BARS", None)]);
    r.snapshot();
    for f in &files {
        let line = format!("org/many: {} (16.00 KiB)", f.path);
        assert_eq!(r.stderr.lines().filter(|l| *l == line).count(), 1, "{line} in: {}", r.stderr);
    }
}
