//! The test-only backends of the testkit crate (testkit/): the conformance
//! harness, the bf16 storage simulation and the memory meter, each checked
//! on the CPU reference.

mod conformance {
    use ferrotune_testkit::conformance::*;
    use ferrotune::backend::cpu::CpuBackend;
    use ferrotune::backend::profiled::Profiled;

    #[test]
    fn cpu_against_itself_passes_every_check_bit_for_bit() {
        let (r, c) = (CpuBackend::new(), Profiled::new(CpuBackend::new()));
        let mut h = Harness::new(&r, &c, Tolerances::same_precision(), 1);
        let checks = h.run(Scale::Small).to_vec();
        assert!(checks.len() > 40, "only {} checks", checks.len());
        for c in &checks {
            assert_eq!(c.rel_err, 0.0, "{c}");
        }
    }

    #[test]
    fn a_wrong_candidate_fails() {
        // The harness must be able to fail: a candidate whose swiglu is off.
        let reference = vec![1.0f32, 2.0, 3.0];
        let off = vec![1.0f32, 2.0, 3.1];
        assert!(!compare("x".into(), &off, &reference, 1e-3).passed());
        assert!(!compare("x".into(), &[f32::NAN, 2.0, 3.0], &reference, 1.0).passed());
        assert!(compare("x".into(), &reference, &reference, 0.0).passed());
    }
}

mod bf16sim {
    use ferrotune::backend::{AttnShape, Backend, Qkv, Varlen, WeightSource};
    use ferrotune_testkit::bf16sim::*;
    use ferrotune::backend::DType;
    use ferrotune::backend::cpu::CpuBackend;

    #[test]
    fn rounds_activation_storage_and_weights_never_f32_buffers() {
        let be = Bf16Sim::new(CpuBackend::new());
        let x = 1.0f32 + 2f32.powi(-12); // not a bf16 value
        assert_eq!(be.download(&be.upload_activation(&[x])), vec![1.0]);
        assert_eq!(be.download(&be.upload(&[x])), vec![x]);
        let w = be.weight_from_f32(&[x]);
        assert_eq!(be.weight_to_f32(&w), vec![1.0]);
        let bytes = x.to_le_bytes();
        let w = be.load_weight(&WeightSource { dtype: DType::F32, bytes: &bytes, numel: 1 }).unwrap();
        assert_eq!(be.weight_to_f32(&w), vec![1.0]);
        // f32 outputs stay f32; activation outputs are rounded.
        let mut f = be.upload(&[1.0]);
        be.scale(&mut f, x);
        assert_eq!(be.download(&f), vec![x]);
        let mut a = be.upload_activation(&[1.0]);
        be.scale(&mut a, x);
        assert_eq!(be.download(&a), vec![1.0]);
        assert_eq!(be.zeros_like(&f).kind(), Storage::F32);
        assert_eq!(be.zeros_like(&a).kind(), Storage::Act);
    }

    #[test]
    #[should_panic(expected = "must share a storage type")]
    fn mixed_kinds_panic_as_on_the_gpu() {
        let be = Bf16Sim::new(CpuBackend::new());
        let mut a = be.zeros(4);
        be.add_assign(&mut a, &be.zeros_f32(4));
    }

    #[test]
    fn host_flash_attention_without_rounding_matches_the_cpu_within_f32_noise() {
        // The host attention with bf16 inputs: its output differs from the
        // CPU's only by the P/out roundings, i.e. at the bf16 level.
        let (cpu, sim) = (CpuBackend::new(), Bf16Sim::with_flash_attention(CpuBackend::new()));
        let (n, nh, nkv, d) = (21, 4, 2, 64);
        let cu = [0, 9, 9, 21];
        let shape = AttnShape { n, n_heads: nh, n_kv_heads: nkv, head_dim: d, window: Some(6), scale: 0.125, softcap: None, max_seqlen: 12 };
        let data = |len: usize, seed: u32| -> Vec<f32> {
            (0..len).map(|i| round_bf16((((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)).collect()
        };
        let (q, k, v) = (data(n * nh * d, 1), data(n * nkv * d, 2), data(n * nkv * d, 3));
        let mut o_c = cpu.zeros(n * nh * d);
        let mut l_c = cpu.zeros_f32(nh * n);
        cpu.attention(Qkv { q: &q, k: &k, v: &v }, Varlen { cu_seqlens: &cu.to_vec(), n_seqs: 3 }, shape, &mut o_c, &mut l_c);
        let (qs, ks, vs) = (sim.upload_activation(&q), sim.upload_activation(&k), sim.upload_activation(&v));
        let mut o_s = sim.zeros(n * nh * d);
        let mut l_s = sim.zeros_f32(nh * n);
        sim.attention(Qkv { q: &qs, k: &ks, v: &vs }, Varlen { cu_seqlens: &sim.upload_ints(&cu), n_seqs: 3 }, shape, &mut o_s, &mut l_s);
        let rel = |a: &[f32], b: &[f32]| {
            let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
            (num / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>()).sqrt()
        };
        assert!(rel(&sim.download(&l_s), &l_c) < 1e-6);
        let e = rel(&sim.download(&o_s), &o_c);
        assert!(e > 0.0 && e < 8e-3, "out rel {e}");
    }
}

mod metered {
    use ferrotune::backend::Backend;
    use ferrotune_testkit::metered::*;
    use ferrotune::backend::cpu::CpuBackend;

    #[test]
    fn counts_bytes_by_kind_and_gives_them_back_on_drop() {
        let be = Metered::new(CpuBackend::new(), 2, 2);
        let w = be.weight_from_f32(&[1.0; 10]);
        let a = be.zeros(8);
        let f = be.zeros_f32(3);
        let like_a = be.zeros_like(&a);
        let like_f = be.zeros_like(&f);
        let ints = be.upload_ints(&[1, 2, 3]);
        let u = be.usage();
        assert_eq!(u.live, MemoryBreakdown { act: 32, f32: 24, ints: 12, weights: 20, total: 88 });
        assert_eq!(be.live_bytes(), 88);
        drop((a, like_a, ints));
        assert_eq!(be.live_bytes(), 44);
        assert_eq!(be.peak_bytes(), 88);
        be.reset_peak();
        assert_eq!(be.peak_bytes(), 44);
        let big = be.upload(&[0.0; 100]);
        drop(big);
        let u = be.usage();
        assert_eq!((u.live.f32, u.peak.f32, u.peak.total), (24, 424, 444));
        assert_eq!(like_f.kind(), Kind::F32);
        drop((w, f, like_f));
        assert_eq!(be.live_bytes(), 0);
    }
}
