//! The PTX of the hand-written CUDA kernels (cuda/*.cu), embedded at build
//! time so that the binary carries its kernels and `cargo build` needs no
//! CUDA toolchain.
//!
//! ptx/<name>.ptx is compiled from cuda/<name>.cu by scripts/regen_ptx.py
//! with the pinned NVRTC 12.4 (PTX ISA 8.4, target sm_80: loaded by drivers
//! 550 and newer, JIT-compiled for newer GPUs); CI proves ptx/ is fresh and that it
//! assembles without spills for sm_80/86/89/90 (scripts/check_ptx.sh).
//! build.rs lists every ptx/*.ptx in [`PTX`].
//!
//! Kernel names are `<op>_<fwd|bwd>_<dtype>` (`rmsnorm_fwd_bf16`) or
//! `<op>_<dtype>` for ops without a backward pair (`cross_entropy_f32`,
//! `adamw_f32`, `fill_bf16`); `<dtype>` is how activations are stored (f32 or
//! bf16). The argument list of every kernel is in the table at the end of
//! this file (checked against the PTX by its tests) and documented in its
//! .cu file; cuda/README.md has the launch conventions.

include!(concat!(env!("OUT_DIR"), "/ptx_modules.rs"));

/// The PTX ISA version every module declares (NVRTC 12.4; drivers >= 550).
pub const PTX_ISA_VERSION: &str = "8.4";

/// The PTX of module `name` (the stem of cuda/<name>.cu), if it exists.
pub fn ptx(name: &str) -> Option<&'static str> {
    PTX.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::Path;

    // The argument lists shared by flash attention's kernels (each also has
    // a soft-capped twin taking the cap last).
    macro_rules! fa_fwd {
        () => {
            "q:ptr k:ptr v:ptr cu_seqlens:ptr out:ptr lse:ptr n:i32 n_seqs:i32 n_heads:i32 n_kv_heads:i32 head_dim:i32 window:i32 scale:f32"
        };
    }
    macro_rules! fa_dq {
        () => {
            "q:ptr k:ptr v:ptr dout:ptr lse:ptr dsum:ptr cu_seqlens:ptr dq:ptr n:i32 n_seqs:i32 n_heads:i32 n_kv_heads:i32 head_dim:i32 window:i32 scale:f32"
        };
    }
    macro_rules! fa_dkdv {
        () => {
            "q:ptr k:ptr v:ptr dout:ptr lse:ptr dsum:ptr cu_seqlens:ptr dk:ptr dv:ptr n:i32 n_seqs:i32 n_heads:i32 n_kv_heads:i32 head_dim:i32 window:i32 scale:f32"
        };
    }

    /// Kernel argument lists, per module, as `name:kind`. Kinds: `ptr`
    /// (device pointer), `u64` (element count, seed), `i32` (shape, flag),
    /// `f32` (scalar). In PTX pointers and u64 are both `.u64`, i32 is `.u32`.
    /// A module listed here must have exactly these kernels.
    const EXPECTED: &[(&str, &[(&str, &str)])] = &[
        ("adamw", &[
            ("adamw_f32", "param:ptr grad:ptr m:ptr v:ptr n:u64 decay:f32 beta1:f32 beta2:f32 one_minus_beta1:f32 one_minus_beta2:f32 step_size:f32 bias_c2_sqrt:f32 eps:f32"),
        ]),
        ("copy_cols", &[
            ("copy_cols_*", "src:ptr dst:ptr rows:i32 src_cols:i32 src_off:i32 dst_cols:i32 dst_off:i32 width:i32"),
            ("scatter_rows_*", "src:ptr dst:ptr positions:ptr rows:i32 width:i32 capacity:i32"),
        ]),
        ("cross_entropy", &[
            ("cross_entropy_*", "logits:ptr targets:ptr losses:ptr rows:i32 vocab:i32 grad_scale:f32 write_grad:i32 softcap:f32"),
        ]),
        ("decode_attn", &[
            ("decode_attention_bf16", "q:ptr k_cache:ptr v_cache:ptr out:ptr n:i32 past:i32 n_heads:i32 n_kv_heads:i32 head_dim:i32 window:i32 scale:f32 softcap:f32"),
            ("decode_attention_batch_bf16", "q:ptr k_cache:ptr v_cache:ptr positions:ptr out:ptr n_seqs:i32 capacity:i32 n_heads:i32 n_kv_heads:i32 head_dim:i32 window:i32 scale:f32 softcap:f32"),
            ("decode_attention_d512_bf16", "q:ptr k_cache:ptr v_cache:ptr out:ptr n:i32 past:i32 n_heads:i32 n_kv_heads:i32 head_dim:i32 window:i32 scale:f32 softcap:f32"),
            ("decode_attention_batch_d512_bf16", "q:ptr k_cache:ptr v_cache:ptr positions:ptr out:ptr n_seqs:i32 capacity:i32 n_heads:i32 n_kv_heads:i32 head_dim:i32 window:i32 scale:f32 softcap:f32"),
        ]),
        ("delta_net", &[
            ("delta_prep_fwd_*", "qkv:ptr conv:ptr hist:ptr cu_seqlens:ptr pre:ptr xn:ptr n:i32 n_seqs:i32 k_heads:i32 k_dim:i32 conv_dim:i32 kernel:i32 has_hist:i32 q_scale:f32"),
            ("delta_scan_fwd_*", "xn:ptr z:ptr b:ptr a:ptr a_log:ptr dt_bias:ptr norm:ptr cu_seqlens:ptr state:ptr out:ptr saved:ptr n_seqs:i32 k_heads:i32 v_heads:i32 k_dim:i32 v_dim:i32 eps:f32 save:i32"),
            ("delta_conv_state_*", "qkv:ptr cu_seqlens:ptr conv_state:ptr n_seqs:i32 conv_dim:i32 kernel:i32"),
            ("delta_scan_bwd_*", "xn:ptr z:ptr b:ptr a:ptr a_log:ptr dt_bias:ptr norm:ptr cu_seqlens:ptr saved:ptr dout:ptr starts:ptr dstate:ptr dqk:ptr dact:ptr dz:ptr db:ptr da:ptr n_seqs:i32 k_heads:i32 v_heads:i32 k_dim:i32 v_dim:i32 eps:f32"),
            ("delta_norm_bwd_f32", "pre:ptr dqk:ptr dact:ptr n:i32 k_heads:i32 v_heads:i32 k_dim:i32 conv_dim:i32 q_scale:f32"),
            ("delta_conv_bwd_*", "dpre:ptr conv:ptr cu_seqlens:ptr dqkv:ptr n:i32 n_seqs:i32 conv_dim:i32 kernel:i32"),
        ]),
        ("elementwise", &[
            ("fill_*", "buf:ptr n:u64 value:f32"),
            ("add_assign_*", "dst:ptr src:ptr n:u64"),
            ("scale_*", "buf:ptr n:u64 s:f32"),
            ("softcap_*", "buf:ptr n:u64 cap:f32"),
            ("sum_sq_partials_*", "x:ptr n:u64 chunk:u64 partials:ptr"),
            ("sum_sq_finalize_f64", "partials:ptr count:u64 out:ptr"),
        ]),
        ("embedding", &[
            ("embedding_fwd_*", "table:ptr ids:ptr out:ptr n:i32 hidden:i32 vocab:i32"),
        ]),
        ("flash_attn", &[
            ("flash_attn_bwd_preprocess", "dout:ptr out:ptr dsum:ptr n:i32 n_heads:i32 head_dim:i32"),
            ("flash_attn_fwd_d64", fa_fwd!()),
            ("flash_attn_fwd_d128", fa_fwd!()),
            ("flash_attn_fwd_capped_d64", concat!(fa_fwd!(), " softcap:f32")),
            ("flash_attn_fwd_capped_d128", concat!(fa_fwd!(), " softcap:f32")),
            ("flash_attn_bwd_dq_d64", fa_dq!()),
            ("flash_attn_bwd_dq_d128", fa_dq!()),
            ("flash_attn_bwd_dq_capped_d64", concat!(fa_dq!(), " softcap:f32")),
            ("flash_attn_bwd_dq_capped_d128", concat!(fa_dq!(), " softcap:f32")),
            ("flash_attn_bwd_dkdv_d64", fa_dkdv!()),
            ("flash_attn_bwd_dkdv_d128", fa_dkdv!()),
            ("flash_attn_bwd_dkdv_capped_d64", concat!(fa_dkdv!(), " softcap:f32")),
            ("flash_attn_bwd_dkdv_capped_d128", concat!(fa_dkdv!(), " softcap:f32")),
        ]),
        ("flash_attn_generic", &[
            ("flash_attn_fwd_generic", fa_fwd!()),
            ("flash_attn_fwd_capped_generic", concat!(fa_fwd!(), " softcap:f32")),
            ("flash_attn_bwd_dq_generic", fa_dq!()),
            ("flash_attn_bwd_dq_capped_generic", concat!(fa_dq!(), " softcap:f32")),
            ("flash_attn_bwd_dkdv_generic", fa_dkdv!()),
            ("flash_attn_bwd_dkdv_capped_generic", concat!(fa_dkdv!(), " softcap:f32")),
            ("flash_attn_fwd_generic_d512", fa_fwd!()),
            ("flash_attn_fwd_capped_generic_d512", concat!(fa_fwd!(), " softcap:f32")),
            ("flash_attn_bwd_dq_generic_d512", fa_dq!()),
            ("flash_attn_bwd_dq_capped_generic_d512", concat!(fa_dq!(), " softcap:f32")),
            ("flash_attn_bwd_dkdv_generic_d512", fa_dkdv!()),
            ("flash_attn_bwd_dkdv_capped_generic_d512", concat!(fa_dkdv!(), " softcap:f32")),
        ]),
        ("lora_dropout", &[
            ("lora_xa_dropout_*", "x:ptr a:ptr xa:ptr m:i32 k:i32 r:i32 seed:u64 p:f32"),
            ("lora_da_dropout_partials_*", "x:ptr dxa:ptr partials:ptr m:i32 k:i32 r:i32 rows_per_split:i32 seed:u64 p:f32"),
            ("lora_da_dropout_finalize_f32", "partials:ptr da:ptr k:i32 r:i32 splits:i32"),
            ("lora_dx_dropout_*", "dxa:ptr a:ptr dx:ptr n:u64 k:i32 r:i32 seed:u64 p:f32"),
        ]),
        ("nf4", &[
            ("nf4_dequantize_bf16", "packed:ptr absmax:ptr code:ptr out:ptr n:u64 blocksize:i32"),
            ("nf4_dequantize_nested_bf16", "packed:ptr absmax_codes:ptr nested_absmax:ptr nested_map:ptr offset:f32 code:ptr out:ptr n:u64 blocksize:i32 nested_blocksize:i32"),
        ]),
        ("rmsnorm", &[
            ("rmsnorm_fwd_*", "x:ptr w:ptr y:ptr inv_rms:ptr rows:i32 hidden:i32 eps:f32 plus_one:i32"),
            ("rmsnorm_bwd_*", "dy:ptr x:ptr w:ptr inv_rms:ptr dx:ptr rows:i32 hidden:i32 plus_one:i32"),
            ("rmsnorm_warp_fwd_*", "x:ptr w:ptr y:ptr inv_rms:ptr rows:i32 hidden:i32 eps:f32 plus_one:i32"),
            ("rmsnorm_warp_bwd_*", "dy:ptr x:ptr w:ptr inv_rms:ptr dx:ptr rows:i32 hidden:i32 plus_one:i32"),
        ]),
        ("rope", &[
            ("rope_fwd_*", "x:ptr positions:ptr inv_freq:ptr n:i32 heads:i32 head_dim:i32 rot_dim:i32 mscale:f32"),
            ("rope_bwd_*", "dx:ptr positions:ptr inv_freq:ptr n:i32 heads:i32 head_dim:i32 rot_dim:i32 mscale:f32"),
        ]),
        ("sample", &[
            ("sample_rows_*", "logits:ptr uniforms:ptr out:ptr rows:i32 vocab:i32 temperature:f32 top_k:i32 top_p:f32 min_p:f32"),
        ]),
        ("glu", &[
            ("swiglu_fwd_*", "gate:ptr up:ptr out:ptr len:u64"),
            ("swiglu_bwd_*", "dout:ptr gate:ptr up:ptr dgate:ptr dup:ptr len:u64"),
            ("geglu_fwd_*", "gate:ptr up:ptr out:ptr len:u64"),
            ("geglu_bwd_*", "dout:ptr gate:ptr up:ptr dgate:ptr dup:ptr len:u64"),
            ("sigmoid_gate_fwd_*", "gate:ptr up:ptr out:ptr len:u64"),
            ("sigmoid_gate_bwd_*", "dout:ptr gate:ptr up:ptr dgate:ptr dup:ptr len:u64"),
        ]),
    ];

    /// `name_*` stands for the f32 and bf16 instantiations; None for a
    /// module this table does not cover.
    fn expected_entries(module: &str) -> Option<BTreeMap<String, Vec<&'static str>>> {
        let (_, kernels) = EXPECTED.iter().find(|(m, _)| *m == module)?;
        let mut out = BTreeMap::new();
        for (name, args) in kernels.iter() {
            let types: Vec<&str> = args
                .split_whitespace()
                .map(|a| match a.split_once(':').expect("name:kind").1 {
                    "ptr" | "u64" => ".u64",
                    "i32" => ".u32",
                    "f32" => ".f32",
                    k => panic!("unknown kind {k}"),
                })
                .collect();
            match name.strip_suffix('*') {
                Some(stem) => {
                    for dt in ["f32", "bf16"] {
                        out.insert(format!("{stem}{dt}"), types.clone());
                    }
                }
                None => {
                    out.insert(name.to_string(), types);
                }
            }
        }
        Some(out)
    }

    /// Entry points of a PTX module with their parameter types.
    fn entries(ptx: &str) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        let mut lines = ptx.lines();
        while let Some(line) = lines.next() {
            let Some(rest) = line.trim().strip_prefix(".visible .entry ") else { continue };
            let name = rest.trim_end_matches('(').trim().to_string();
            let mut params = Vec::new();
            for l in lines.by_ref() {
                let l = l.trim();
                if l.starts_with(')') {
                    break;
                }
                let ty = l.strip_prefix(".param ").and_then(|p| p.split_whitespace().next());
                params.push(ty.unwrap_or_else(|| panic!("{name}: unexpected parameter line {l:?}")).to_string());
            }
            out.insert(name, params);
        }
        out
    }

    fn cuda_sources() -> Vec<String> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("cuda/")
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cu"))
            .map(|p| p.file_stem().unwrap().to_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn every_cuda_source_has_embedded_ptx_and_no_other() {
        let sources = cuda_sources();
        assert!(!sources.is_empty(), "no cuda/*.cu");
        let embedded: Vec<String> = PTX.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(
            embedded, sources,
            "ptx/ and cuda/ disagree: run scripts/regen_ptx.py and commit ptx/"
        );
        for name in &sources {
            assert!(ptx(name).is_some_and(|p| !p.is_empty()), "{name}");
        }
        assert_eq!(ptx("no_such_module"), None);
    }

    #[test]
    fn every_module_declares_ptx_isa_8_4_for_sm_80() {
        for (name, text) in PTX {
            let directive = |d: &str| text.lines().find_map(|l| l.strip_prefix(d).map(str::trim));
            assert_eq!(directive(".version "), Some(PTX_ISA_VERSION), "ptx/{name}.ptx .version");
            assert_eq!(directive(".target "), Some("sm_80"), "ptx/{name}.ptx .target");
            assert_eq!(directive(".address_size "), Some("64"), "ptx/{name}.ptx .address_size");
        }
    }

    /// Modules in EXPECTED must have exactly its kernels and argument types;
    /// any other module must at least have a kernel.
    #[test]
    fn every_module_has_exactly_the_expected_kernels_and_arguments() {
        for (name, text) in PTX {
            let got = entries(text);
            let Some(want) = expected_entries(name) else {
                assert!(!got.is_empty(), "ptx/{name}.ptx has no kernel entry point");
                continue;
            };
            let want_names: Vec<&String> = want.keys().collect();
            let got_names: Vec<&String> = got.keys().collect();
            assert_eq!(got_names, want_names, "entry points of ptx/{name}.ptx");
            for (kernel, types) in &want {
                assert_eq!(&got[kernel], types, "parameter types of {kernel} in ptx/{name}.ptx");
            }
        }
        for (module, _) in EXPECTED {
            assert!(ptx(module).is_some(), "EXPECTED lists {module}, which has no PTX");
        }
    }
}
