//! `ferrotune download` against the mock Hub (tests/common/mock_hub.rs):
//! the cache it fills equals huggingface_hub's (the committed trees of
//! tests/fixtures/hub), revisions, file filters, dataset repos, reruns,
//! tokens, the one-line errors, the environment, offline use, renamed repos,
//! and a cache made by huggingface_hub used offline. Faults (cut or
//! corrupted bodies, killed runs) and parallel downloads: faults.rs; models,
//! adapters and datasets fetched on demand by the other commands: e2e.rs;
//! through an HTTPS_PROXY: proxy.rs.

#[path = "../common/hub_cli.rs"]
mod hub_cli;
#[path = "../common/hub_tree.rs"]
mod hub_tree;
#[path = "../common/mock_hub.rs"]
mod mock_hub;

mod e2e;
mod faults;
mod proxy;

use hub_cli::{Sandbox, assert_phrases, assert_tree, snapshot_files};
use hub_tree::{DATASET_ID, MODEL_ID, dataset_repo, load_fixture, materialise, model_repo};
use mock_hub::{Access, MockFile, MockHub, MockRepo, closed_endpoint};

const FOLDER: &str = "models--ferrotune-test--tiny-model";
const TREE_ARGS: &[&str] = &[MODEL_ID, "--include", "*.json", "--include", "*.safetensors"];

fn hub() -> MockHub {
    MockHub::start(vec![model_repo(), dataset_repo()])
}

/// Variables set (`Some`) or removed (`None`) for one run.
type Vars<'a> = [(&'a str, Option<&'a str>)];

fn args<'a>(base: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(more).copied().collect()
}

/// The cache of `main` equals huggingface_hub's, link for link; the LFS
/// file's 302 is read, not followed, on the HEAD.
#[test]
fn download_at_main_makes_huggingface_hubs_tree() {
    let hub = hub();
    let sb = Sandbox::new(&hub.url());
    let snap = sb.download(TREE_ARGS).snapshot();
    assert_eq!(snap, sb.cache.join(load_fixture("main")["snapshot"].as_str().unwrap()));
    assert_tree(&sb.cache, "main");
    let log = hub.requests();
    assert!(log.iter().any(|r| r.method == "HEAD" && r.path().ends_with("/model.safetensors") && r.status == 302), "{log:?}");
    assert!(!log.iter().any(|r| r.method == "HEAD" && r.target.starts_with("/cdn/")), "{log:?}");
}

/// `refs/pr/1`: asked as `refs%2Fpr%2F1`, recorded in a nested refs/refs/pr/1.
#[test]
fn download_at_a_pr_ref_makes_huggingface_hubs_tree() {
    let hub = hub();
    let sb = Sandbox::new(&hub.url());
    let snap = sb.download(&args(TREE_ARGS, &["--revision", "refs/pr/1"])).snapshot();
    assert_eq!(snap, sb.cache.join(load_fixture("pr1")["snapshot"].as_str().unwrap()));
    assert_tree(&sb.cache, "pr1");
    assert!(hub.requests().iter().any(|r| r.target == "/api/models/ferrotune-test/tiny-model/revision/refs%2Fpr%2F1"));
}

/// A full commit needs no resolving and writes no ref.
#[test]
fn download_at_a_commit_makes_huggingface_hubs_tree_without_a_ref() {
    let hub = hub();
    let sb = Sandbox::new(&hub.url());
    let commit = model_repo().commit_of("main").to_string();
    let snap = sb.download(&args(TREE_ARGS, &["--revision", &commit])).snapshot();
    assert_eq!(snap, sb.repo_dir(FOLDER).join("snapshots").join(&commit));
    assert_tree(&sb.cache, "commit");
    assert!(!sb.repo_dir(FOLDER).join("refs").exists());
    assert!(!hub.requests().iter().any(|r| r.target.contains("/revision/")), "{:?}", hub.requests());
}

/// A dataset repo: `datasets--org--name`, `datasets/` URLs, every file.
#[test]
fn dataset_download_makes_huggingface_hubs_tree() {
    let hub = hub();
    let sb = Sandbox::new(&hub.url());
    let snap = sb.download(&[DATASET_ID, "--repo-type", "dataset"]).snapshot();
    assert_eq!(snap, sb.cache.join(load_fixture("dataset")["snapshot"].as_str().unwrap()));
    assert_tree(&sb.cache, "dataset");
    let log = hub.requests();
    assert!(log.iter().filter(|r| r.target.contains("/resolve/")).all(|r| r.target.starts_with("/datasets/ferrotune-test/tiny-data/resolve/")), "{log:?}");
    assert!(log.iter().any(|r| r.target.starts_with("/api/datasets/ferrotune-test/tiny-data/tree/")));
}

/// A tag resolves to its commit; refs/<tag> holds it without a newline.
#[test]
fn a_tag_downloads_its_commit() {
    let hub = hub();
    let sb = Sandbox::new(&hub.url());
    let repo = model_repo();
    let snap = sb.download(&[MODEL_ID, "--revision", "v1.0", "--include", "*"]).snapshot();
    assert_eq!(snap, sb.repo_dir(FOLDER).join("snapshots").join(repo.commit_of("v1.0")));
    assert_eq!(std::fs::read(sb.repo_dir(FOLDER).join("refs/v1.0")).unwrap(), repo.commit_of("v1.0").as_bytes());
    assert_eq!(snapshot_files(&snap), ["config.json", "model.safetensors", "tokenizer.json"]);
    assert_eq!(std::fs::read(snap.join("config.json")).unwrap(), repo.file("v1.0", "config.json").bytes);
}

/// The default model filter, and --include/--exclude as allow_patterns /
/// ignore_patterns (`*` crosses `/`, a trailing `/` means the folder).
#[test]
fn include_and_exclude_select_files_as_huggingface_hub() {
    let hub = hub();
    let cases: &[(&[&str], &[&str])] = &[
        (&[], &[".gitattributes", "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]),
        (&["--include", "*.json"], &["config.json", "generation_config.json", "original/params.json", "sub/dir/file.json", "tokenizer.json", "tokenizer_config.json"]),
        (&["--include", "sub/"], &["sub/dir/file.json"]),
        (&["--include", "*.json", "--exclude", "original/*", "--exclude", "*config.json"], &["sub/dir/file.json", "tokenizer.json"]),
        (&["--include", "*.gguf", "--include", "pytorch_model.bin"], &["model.gguf", "pytorch_model.bin"]),
        (&["--exclude", "*.safetensors"], &[".gitattributes", "README.md", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]),
    ];
    for (flags, want) in cases {
        let sb = Sandbox::new(&hub.url());
        let snap = sb.download(&args(&[MODEL_ID], flags)).snapshot();
        assert_eq!(snapshot_files(&snap), *want, "{flags:?}");
    }
}

/// A second run fetches no bytes and leaves the same tree; a blob shared
/// by two revisions is fetched once.
#[test]
fn reruns_and_shared_blobs_fetch_nothing_again() {
    let hub = hub();
    let sb = Sandbox::new(&hub.url());
    let snap = sb.download(&[MODEL_ID]).snapshot();
    let before = hub_tree::dump_cache(&sb.cache);
    hub.clear_requests();
    assert_eq!(sb.download(&[MODEL_ID]).snapshot(), snap);
    let log = hub.requests();
    assert!(!log.iter().any(|r| r.is_body_get()), "{log:?}");
    assert_eq!(hub_tree::dump_cache(&sb.cache), before);
    sb.download(&[MODEL_ID, "--revision", "refs/pr/1"]).snapshot();
    let log = hub.requests();
    assert!(!log.iter().any(|r| r.target.starts_with("/cdn/")), "model.safetensors fetched again: {log:?}");
    assert!(log.iter().any(|r| r.is_body_get() && r.path().ends_with("/config.json")));
}

fn gated_and_private() -> MockHub {
    let files = model_repo().files_at("v1.0").to_vec();
    let gated = MockRepo { access: Access::Gated { granted: vec!["hf_granted".into()] }, ..MockRepo::model("org/gated", files.clone()) };
    let private = MockRepo { access: Access::Private { token: "hf_owner".into() }, ..MockRepo::model("org/private", files) };
    MockHub::start(vec![model_repo(), gated, private])
}

/// Gated: no token -> set HF_TOKEN; a token without access -> request
/// access; a granted token downloads, and never goes to the CDN host.
#[test]
fn gated_repos_say_what_to_do() {
    let hub = gated_and_private();
    let sb = Sandbox::new(&hub.url());
    let e = sb.download(&["org/gated"]).error();
    assert_phrases(&e, &["org/gated", "is gated", "set HF_TOKEN"]);
    let e = sb.download_env(&["org/gated"], &[("HF_TOKEN", Some("hf_other"))]).error();
    assert_phrases(&e, &["org/gated", "is gated", "request access"]);
    hub.clear_requests();
    sb.download_env(&["org/gated"], &[("HF_TOKEN", Some("hf_granted"))]).snapshot();
    let log = hub.requests();
    assert!(log.iter().filter(|r| r.target.contains("/resolve/")).all(|r| r.header("authorization") == Some("Bearer hf_granted")), "{log:?}");
    assert!(log.iter().any(|r| r.target.starts_with("/cdn/")));
    assert!(log.iter().filter(|r| r.target.starts_with("/cdn/")).all(|r| r.header("authorization").is_none()), "{log:?}");
}

/// Private: without a token it reads as missing-or-private; with it, it works.
#[test]
fn private_repos_need_their_token() {
    let hub = gated_and_private();
    let sb = Sandbox::new(&hub.url());
    let e = sb.download(&["org/private"]).error();
    assert_phrases(&e, &["org/private", "not found (or private: set HF_TOKEN"]);
    let snap = sb.download_env(&["org/private"], &[("HF_TOKEN", Some("hf_owner"))]).snapshot();
    assert_eq!(snapshot_files(&snap), ["config.json", "model.safetensors", "tokenizer.json"]);
}

/// Unknown repo (with and without a token), unknown revision, and a model
/// run on a repo without config.json give their distinct messages.
#[test]
fn unknown_repos_revisions_and_files_are_named() {
    let no_config = MockRepo::model("org/no-config", vec![MockFile::regular("tokenizer.json", "{}")]);
    let hub = MockHub::start(vec![model_repo(), no_config]);
    let sb = Sandbox::new(&hub.url());
    let e = sb.download(&["org/missing"]).error();
    assert_phrases(&e, &["org/missing", "not found (or private: set HF_TOKEN"]);
    let e = sb.download_env(&["org/missing"], &[("HF_TOKEN", Some("hf_someone"))]).error();
    assert_phrases(&e, &["org/missing", "does not exist"]);
    let e = sb.download(&[MODEL_ID, "--revision", "no-such-branch"]).error();
    assert_phrases(&e, &["revision no-such-branch of ", MODEL_ID, " does not exist"]);
    let out = sb.tmp.path().join("q");
    let e = hub_cli::run(sb.cmd(&["quantize", "--model", "org/no-config", "--out", out.to_str().unwrap()])).error();
    assert_phrases(&e, &["org/no-config@main has no file config.json"]);
}

/// A closed port: the message names the endpoint; a cached repo still works.
#[test]
fn unreachable_hub_names_the_endpoint_and_falls_back_to_the_cache() {
    let hub = hub();
    let closed = closed_endpoint();
    let sb = Sandbox::new(&closed);
    let e = sb.download(&[MODEL_ID]).error();
    assert_phrases(&e, &["cannot reach ", &closed]);
    let snap = sb.download_env(&[MODEL_ID], &[("HF_ENDPOINT", Some(&hub.url()))]).snapshot();
    assert_eq!(sb.download(&[MODEL_ID]).snapshot(), snap);
}

/// HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE): the cached snapshot by its
/// ref or commit, or the offline error; never a connection.
#[test]
fn offline_uses_the_cache_only() {
    let hub = hub();
    let sb = Sandbox::new(&hub.url());
    let e = sb.download_env(&[MODEL_ID], &[("HF_HUB_OFFLINE", Some("1"))]).error();
    assert_phrases(&e, &["HF_HUB_OFFLINE is set and ", MODEL_ID, "is not in the cache at ", sb.cache.to_str().unwrap()]);
    assert_eq!(hub.connections(), 0);
    let snap = sb.download(&[MODEL_ID]).snapshot();
    let seen = hub.connections();
    let commit = model_repo().commit_of("main").to_string();
    for vars in [[("HF_HUB_OFFLINE", Some("1"))], [("TRANSFORMERS_OFFLINE", Some("1"))]] {
        assert_eq!(sb.download_env(&[MODEL_ID], &vars).snapshot(), snap);
        assert_eq!(sb.download_env(&[MODEL_ID, "--revision", &commit], &vars).snapshot(), snap);
    }
    let e = sb.download_env(&[MODEL_ID, "--revision", "v1.0"], &[("HF_HUB_OFFLINE", Some("1"))]).error();
    assert_phrases(&e, &["HF_HUB_OFFLINE is set and ", MODEL_ID, "is not in the cache at "]);
    assert_eq!(hub.connections(), seen, "offline runs connected");
}

/// A snapshot an interrupted run left without one file: offline, or with
/// the Hub unreachable, the cached listing (trees/) shows the gap and the
/// error names the missing file instead of using half a model.
#[test]
fn a_partial_snapshot_is_not_taken_for_a_whole_one() {
    let hub = hub();
    let sb = Sandbox::new(&hub.url());
    let snap = sb.download(&[MODEL_ID]).snapshot();
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    let e = sb.download_env(&[MODEL_ID], &[("HF_HUB_OFFLINE", Some("1"))]).error();
    assert_phrases(&e, &["HF_HUB_OFFLINE is set and ", MODEL_ID, "(file model.safetensors) is not in the cache"]);
    let closed = closed_endpoint();
    let r = sb.download_env(&[MODEL_ID], &[("HF_ENDPOINT", Some(&closed))]);
    assert_phrases(&r.error(), &["model.safetensors of ", MODEL_ID, "is not in the cached snapshot", "cannot reach ", &closed]);
    // Back online, the missing file is fetched (its blob was still there).
    assert_eq!(sb.download(&[MODEL_ID]).snapshot(), snap);
    assert!(snap.join("model.safetensors").is_file());
}

/// The token: HF_TOKEN, else HUGGING_FACE_HUB_TOKEN, else the file
/// HF_TOKEN_PATH (default $HF_HOME/token); empty counts as unset; sent to
/// the Hub, never to the CDN.
#[test]
fn the_token_comes_from_the_environment_as_in_huggingface_hub() {
    let hub = hub();
    // (variables, token file in HF_HOME, the token sent)
    let cases: &[(&Vars, Option<&str>, &str)] = &[
        (&[("HF_TOKEN", Some("hf_env"))], Some("hf_file"), "hf_env"),
        (&[], Some("hf_file"), "hf_file"),
        (&[("HF_TOKEN", Some(""))], Some("hf_file"), "hf_file"),
        (&[("HUGGING_FACE_HUB_TOKEN", Some("hf_legacy"))], Some("hf_file"), "hf_legacy"),
        (&[("HF_TOKEN", Some("hf_env")), ("HUGGING_FACE_HUB_TOKEN", Some("hf_legacy"))], None, "hf_env"),
    ];
    for (vars, file, want) in cases {
        let sb = Sandbox::new(&hub.url());
        if let Some(t) = file {
            std::fs::write(sb.hf_home.join("token"), format!("{t}\n")).unwrap();
        }
        hub.clear_requests();
        sb.download_env(&[MODEL_ID, "--include", "config.json", "--include", "model.safetensors"], vars).snapshot();
        let log = hub.requests();
        let bearer = format!("Bearer {want}");
        assert!(log.iter().filter(|r| !r.target.starts_with("/cdn/")).all(|r| r.header("authorization") == Some(bearer.as_str())), "{vars:?}: {log:?}");
        assert!(log.iter().filter(|r| r.target.starts_with("/cdn/")).all(|r| r.header("authorization").is_none()), "{log:?}");
    }
    let sb = Sandbox::new(&hub.url());
    let path = sb.tmp.path().join("elsewhere");
    std::fs::write(&path, "hf_path\n").unwrap();
    hub.clear_requests();
    sb.download_env(&[MODEL_ID, "--include", "config.json"], &[("HF_TOKEN_PATH", Some(path.to_str().unwrap()))]).snapshot();
    assert!(hub.requests().iter().all(|r| r.header("authorization") == Some("Bearer hf_path")));
    hub.clear_requests();
    let sb = Sandbox::new(&hub.url());
    sb.download(&[MODEL_ID, "--include", "config.json"]).snapshot();
    assert!(hub.requests().iter().all(|r| r.header("authorization").is_none()));
}

/// HF_HUB_CACHE > HUGGINGFACE_HUB_CACHE > HF_HOME/hub >
/// XDG_CACHE_HOME/huggingface/hub > ~/.cache/huggingface/hub (empty counts
/// as unset); HF_ENDPOINT's trailing slash is dropped.
#[test]
fn the_cache_folder_follows_huggingface_hubs_precedence() {
    let hub = hub();
    let sb = Sandbox::new(&hub.url());
    let t = sb.tmp.path();
    let (a, b, c, d) = (t.join("a"), t.join("b"), t.join("c"), t.join("d"));
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (a, b, c, d) = (s(&a), s(&b), s(&c), s(&d));
    let cases: Vec<(Box<Vars>, String)> = vec![
        (Box::new([("HF_HUB_CACHE", Some(&a)), ("HUGGINGFACE_HUB_CACHE", Some(&b)), ("HF_HOME", Some(&c)), ("XDG_CACHE_HOME", Some(&d))]), a.clone()),
        (Box::new([("HF_HUB_CACHE", None), ("HUGGINGFACE_HUB_CACHE", Some(&b)), ("HF_HOME", Some(&c)), ("XDG_CACHE_HOME", Some(&d))]), b.clone()),
        (Box::new([("HF_HUB_CACHE", Some("")), ("HUGGINGFACE_HUB_CACHE", Some(&b))]), b.clone()),
        (Box::new([("HF_HUB_CACHE", None), ("HF_HOME", Some(&c)), ("XDG_CACHE_HOME", Some(&d))]), format!("{c}/hub")),
        (Box::new([("HF_HUB_CACHE", None), ("HF_HOME", None), ("XDG_CACHE_HOME", Some(&d))]), format!("{d}/huggingface/hub")),
        (Box::new([("HF_HUB_CACHE", None), ("HF_HOME", None)]), format!("{}/.cache/huggingface/hub", s(&sb.home))),
    ];
    let commit = model_repo().commit_of("main").to_string();
    for (vars, root) in cases {
        let snap = sb.download_env(&[MODEL_ID, "--include", "config.json"], &vars).snapshot();
        assert_eq!(snap, std::path::Path::new(&root).join(FOLDER).join("snapshots").join(&commit), "{vars:?}");
    }
    hub.clear_requests();
    let slash = format!("{}/", hub.url());
    sb.download_env(&[MODEL_ID, "--include", "config.json"], &[("HF_ENDPOINT", Some(&slash))]).snapshot();
    let log = hub.requests();
    assert!(!log.is_empty() && log.iter().all(|r| !r.target.starts_with("//") && r.status < 400), "{log:?}");
}

/// A renamed repo: its old id answers 307 with a relative Location, which
/// is followed (the cache folder keeps the id asked for, as in huggingface_hub).
#[test]
fn a_renamed_repo_is_followed() {
    let moved = MockRepo { renamed_from: Some("org/old-name".into()), ..MockRepo::model("org/new-name", model_repo().files_at("v1.0").to_vec()) };
    let hub = MockHub::start(vec![moved]);
    let sb = Sandbox::new(&hub.url());
    let snap = sb.download(&["org/old-name"]).snapshot();
    assert!(snap.starts_with(sb.repo_dir("models--org--old-name/snapshots")), "{}", snap.display());
    assert_eq!(snapshot_files(&snap), ["config.json", "model.safetensors", "tokenizer.json"]);
    let log = hub.requests();
    assert!(log.iter().any(|r| r.method == "HEAD" && r.target.starts_with("/org/old-name/resolve/") && r.status == 307), "{log:?}");
    assert!(log.iter().any(|r| r.method == "HEAD" && r.target.starts_with("/org/new-name/resolve/") && r.status == 302), "{log:?}");
}

/// A cache huggingface_hub made (the committed trees, rebuilt) serves
/// ferrotune offline with no connection, and online with no byte fetched.
#[test]
fn a_cache_made_by_huggingface_hub_serves_ferrotune() {
    let hub = hub();
    let commit = model_repo().commit_of("main").to_string();
    let cases: &[(&str, Vec<&str>)] = &[
        ("main", TREE_ARGS.to_vec()),
        ("pr1", args(TREE_ARGS, &["--revision", "refs/pr/1"])),
        ("commit", args(TREE_ARGS, &["--revision", &commit])),
        ("dataset", vec![DATASET_ID, "--repo-type", "dataset"]),
    ];
    for (name, flags) in cases {
        let fixture = load_fixture(name);
        let sb = Sandbox::new(&hub.url());
        materialise(&fixture, &[model_repo(), dataset_repo()], &sb.cache);
        let want = sb.cache.join(fixture["snapshot"].as_str().unwrap());
        let seen = hub.connections();
        assert_eq!(sb.download_env(flags, &[("HF_HUB_OFFLINE", Some("1"))]).snapshot(), want, "{name}");
        assert_eq!(hub.connections(), seen, "{name}: the offline run connected");
        let before = hub_tree::dump_cache(&sb.cache);
        hub.clear_requests();
        assert_eq!(sb.download(flags).snapshot(), want, "{name}");
        assert!(!hub.requests().iter().any(|r| r.is_body_get()), "{name}: {:?}", hub.requests());
        assert_eq!(hub_tree::dump_cache(&sb.cache), before, "{name}: the cache changed");
    }
}
